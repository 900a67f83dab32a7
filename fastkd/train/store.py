"""Teacher-output store: the teacher runs once, before training, and training replays its outputs.

After FKD (Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", 2022):
for every training image, ``M`` augmentations (random-resized-crop box + flip) are drawn once, the
teacher runs once on each, and its top-k log-probabilities at temperature 1 are stored with the
box and the flip. Training then takes one stored augmentation per image and epoch, replays it
exactly and reads the teacher's sparse output from disk: no teacher forward in the training loop.

``python -m fastkd.train store build --output DIR --crops M --topk K [data/teacher options]``
builds a store (:func:`build`); ``python -m fastkd.train --teacher-store DIR --method kd|topk|dih``
trains from one (:func:`open_for_run`, :class:`ReplayDataset`, :func:`teacher_fn`);
``python -m fastkd.train store info DIR`` verifies one and prints its metadata.

Layout of DIR (all ``.npy`` files are numpy arrays read as memory maps, so DataLoader workers read
rows at random without loading the store; ``N`` images, ``M`` crops, ``n`` teachers, ``k``)::

    meta.json    format, version, teachers (name, sha256 of their weights), k, M, the transform,
                 the data set (classes, size, fingerprint), seed, dtypes, chunking, complete flag
    boxes.npy    int32   [N, M, 5]     top, left, height, width, flip of each crop
    ids.npy      uint8 / int16 / int32 [N, M, n, k]   class ids (smallest type holding C - 1)
    values.npy   float16 [N, M, n, k]  log-probabilities at temperature 1, descending
    done.npy     int64   [chunks]      0 until the chunk's rows are on disk, then 2^32 + CRC-32
                                       of the chunk's bytes (boxes, ids, values)

Size: ``N * M * (20 + n * k * (b_id + 2))`` bytes, ``b_id`` = 1 (C <= 256), 2 (C <= 32768) or 4.
ImageNet-1k (N = 1,281,167, M = 8, k = 10, one teacher): 1,281,167 * 8 * (20 + 10 * 4) =
615 MB.

Reliability: the build writes whole chunks of ``--batch-size`` images at their byte offsets
(``os.pwrite``, no shared dirty pages between processes), fsyncs them, then marks the chunk done
with its checksum; a rerun of the same command skips the done chunks (kill -9 loses at most the
chunks in flight). ``meta.json`` says ``"complete": true`` only after every chunk is marked, and is
replaced atomically. Under torchrun rank r fills chunks r, r + world, ...; rank 0 finalises after
a barrier. Reading a store checks everything before the first step -- completeness, file sizes,
shapes and dtypes against the metadata, every chunk's checksum, ids below C, finite values -- and
that it matches the run (teacher, weights, classes, data set, transform, k); a mismatch or damage
is a :class:`StoreError` naming it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.augment import CropFlip, augmentation_key, image_size
from . import distributed
from .config import SYNTHETIC, Config, ConfigError

FORMAT = "fastkd-teacher-store"
VERSION = 1
META = "meta.json"
FILES = ("boxes", "ids", "values")
# Methods a store can serve: they need the teacher's class probabilities only.
STORE_METHODS = ("kd", "topk", "dih")


class StoreError(RuntimeError):
    """A teacher store that cannot be used: missing, incomplete, damaged, or built for another
    teacher or data set."""


def id_dtype(classes: int) -> np.dtype:
    """The smallest integer type that holds the class ids 0 .. classes - 1."""
    if classes <= 256:
        return np.dtype(np.uint8)
    if classes <= 32768:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


def store_bytes(images: int, crops: int, teachers: int, k: int, classes: int) -> int:
    """Bytes of a store's data files (the size formula of the module docstring)."""
    return images * crops * (20 + teachers * k * (id_dtype(classes).itemsize + 2))


# -- the data a store covers ----------------------------------------------------------------------


@dataclass
class Source:
    """A run's training images before augmentation, and the train transform split in two."""

    images: Dataset  # index -> (un-augmented image: PIL or [C, H, W] tensor, label)
    crop: CropFlip
    post: Callable | None  # after the crop and flip: ToTensor + Normalize, or nothing
    classes: list[str]
    fingerprint: str
    input_shape: tuple[int, int, int]

    def transform_dict(self) -> dict[str, Any]:
        return {**self.crop.to_dict(), "after": repr(self.post) if self.post else "none"}


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def source(cfg: Config) -> Source:
    """The training set ``cfg`` names, un-augmented, with its train transform's crop and flip."""
    from ..data import (
        AUGMENTATION,
        NUM_CLASSES,
        BatchedTensorDataset,
        SyntheticImages,
        load_digits_split,
    )

    if cfg.data is None:
        train, _ = load_digits_split(cfg.train_fraction)
        fp = _sha(train.images.numpy().tobytes(), train.labels.numpy().tobytes())
        return Source(BatchedTensorDataset(train.images, train.labels), AUGMENTATION, None,
                      [str(c) for c in range(NUM_CLASSES)], fp, (1, 8, 8))
    shape = (3, cfg.image_size, cfg.image_size)
    if cfg.data == SYNTHETIC:
        images = SyntheticImages(cfg.synthetic_images, cfg.synthetic_classes, shape, cfg.seed)
        fp = _sha(json.dumps(["synthetic", cfg.synthetic_images, cfg.synthetic_classes,
                              list(shape), cfg.seed]).encode())
        return Source(images, CropFlip(cfg.image_size), None,
                      [str(c) for c in range(cfg.synthetic_classes)], fp, shape)
    from ..data.imagefolder import raw_train_folder

    try:
        images, post = raw_train_folder(cfg.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    root = Path(cfg.data) / "train"
    listing = [[os.path.relpath(p, root), int(y)] for p, y in images.samples]
    fp = _sha(json.dumps(listing).encode())
    return Source(images, CropFlip(cfg.image_size), post, list(images.classes), fp, shape)


# -- teachers -------------------------------------------------------------------------------------


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict: every tensor's name, dtype, shape and bytes, in key order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def teacher_sha256(cfg: Config, paths: list[str | None], classes: int,
                   input_shape: tuple[int, int, int]) -> str:
    """sha256 of the teacher's weights as the run loads them (the plain model, no feature
    extraction; random initialisation where ``paths`` is ``[None]``)."""
    import dataclasses

    from . import teacher as teachers_mod

    plain = dataclasses.replace(cfg, method="kd")
    net = teachers_mod.build_teachers(plain, paths, classes, input_shape)[0]
    return weights_sha256(net.weights())


def run_teacher_sha256(cfg: Config, src: Source, log: Callable[[str], None]) -> str | None:
    """The sha256 of the teacher a run from a store stands for, or None where it cannot be had
    without training it (the built-in teacher, not cached): then only its name is checked."""
    from . import teacher as teachers_mod

    if cfg.teacher_weights:
        paths: list[str | None] = [cfg.teacher_weights[0]]
    elif cfg.data == SYNTHETIC:
        paths = [None]
    else:
        entry = teachers_mod.cache_entries(cfg, 1)[0]
        if not entry.path.exists():
            log(f"--teacher-store: the built-in teacher is not cached ({entry.path}); its name is "
                "checked against the store, its weights are not")
            return None
        paths = [str(entry.path)]
    return teacher_sha256(cfg, paths, len(src.classes), src.input_shape)


def teacher_names(cfg: Config, heads: int = 0) -> list[str]:
    return [f"{cfg.teacher}:head{i + 1}" for i in range(heads)] + [cfg.teacher]


def _kind(method: str) -> str:
    return "dih" if method == "dih" else "teacher"


# -- the metadata ---------------------------------------------------------------------------------


def _identity(cfg: Config, src: Source, teacher_sha: str | None) -> dict[str, Any]:
    """What a store must agree on with a run that reads it."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "cohort": _kind(cfg.method),
        "teacher": cfg.teacher,
        "teacher_sha256": teacher_sha,
        "classes": src.classes,
        "num_images": len(src.images),
        "dataset": cfg.data or "digits",
        "dataset_fingerprint": src.fingerprint,
        "transform": src.transform_dict(),
    }


def _build_meta(cfg: Config, src: Source, teacher_sha: str, names: list[str],
                extra_sha: dict[str, str]) -> dict[str, Any]:
    n = len(src.images)
    chunk = cfg.batch_size
    return {
        **_identity(cfg, src, teacher_sha),
        "teachers": names,
        "weights_sha256": extra_sha,
        "k": cfg.topk,
        "crops": cfg.crops,
        "seed": cfg.seed,
        "chunk_images": chunk,
        "chunks": math.ceil(n / chunk),
        "dtypes": {"boxes": "int32", "ids": id_dtype(len(src.classes)).name,
                   "values": "float16", "done": "int64"},
        "values": "log-probabilities at temperature 1 (log_softmax over all classes), top k, "
                  "descending",
        "box_fields": ["top", "left", "height", "width", "flip"],
        "amp": cfg.amp,
        "channels_last": bool(cfg.channels_last),
        "complete": False,
    }


def _shapes(meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    n, m, t, k = meta["num_images"], meta["crops"], len(meta["teachers"]), meta["k"]
    return {"boxes": (n, m, 5), "ids": (n, m, t, k), "values": (n, m, t, k),
            "done": (meta["chunks"],)}


def _read_meta(path: Path) -> dict[str, Any]:
    file = path / META
    if not file.is_file():
        raise StoreError(f"teacher store {path}: no {META}; not a teacher store (build one with "
                         "`python -m fastkd.train store build`)")
    try:
        meta = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"teacher store {path}: {META} is unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StoreError(f"teacher store {path}: {META} is not a fastkd teacher store's")
    if meta.get("version") != VERSION:
        raise StoreError(f"teacher store {path}: format version {meta.get('version')}, this "
                         f"trainer reads version {VERSION}")
    return meta


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _differences(saved: dict[str, Any], wanted: dict[str, Any], keys) -> list[str]:
    out = []
    for key in keys:
        a, b = saved.get(key), wanted.get(key)
        if a != b:
            if key == "classes":
                a, b = _describe_classes(a), _describe_classes(b)
            elif key == "teacher_sha256":
                a = a[:12] if a else a
                b = b[:12] if b else b
            out.append(f"{key}: store {a!r}, this run {b!r}")
    return out


def _describe_classes(classes) -> str:
    if not isinstance(classes, list):
        return repr(classes)
    head = ", ".join(map(str, classes[:4]))
    return f"{len(classes)} classes [{head}{', ...' if len(classes) > 4 else ''}]"


# -- opening and verifying ------------------------------------------------------------------------


def _load_array(path: Path, name: str, meta: dict[str, Any], mode: str = "r") -> np.ndarray:
    file = path / f"{name}.npy"
    if not file.is_file():
        raise StoreError(f"teacher store {path}: {file.name} is missing")
    try:
        arr = np.load(file, mmap_mode=mode, allow_pickle=False)
    except ValueError as e:
        raise StoreError(f"teacher store {path}: {file.name} is truncated or corrupt ({e})"
                         ) from None
    want_shape = _shapes(meta)[name]
    want_dtype = np.dtype(meta["dtypes"][name])
    if tuple(arr.shape) != want_shape or arr.dtype != want_dtype:
        raise StoreError(
            f"teacher store {path}: {file.name} holds {arr.dtype} {tuple(arr.shape)}, the "
            f"metadata says {want_dtype} {want_shape}")
    expected_size = arr.offset + arr.nbytes
    actual = file.stat().st_size
    if actual != expected_size:
        raise StoreError(f"teacher store {path}: {file.name} is {actual} bytes, expected "
                         f"{expected_size} (truncated or appended to)")
    return arr


def _chunk_crc(arrays: dict[str, np.ndarray], lo: int, hi: int) -> int:
    crc = 0
    for name in FILES:
        crc = zlib.crc32(np.ascontiguousarray(arrays[name][lo:hi]).tobytes(), crc)
    return crc


def verify(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a complete store once and checks it; its metadata, or StoreError naming the fault."""
    path = Path(path)
    meta = _read_meta(path)
    if not meta.get("complete"):
        done = 0
        if (path / "done.npy").is_file():
            try:
                done = int((np.load(path / "done.npy", mmap_mode="r") != 0).sum())
            except ValueError:
                pass
        raise StoreError(
            f"teacher store {path} is incomplete ({done} of {meta.get('chunks')} chunks built); "
            "rerun the same `store build` command to finish it")
    arrays = {name: _load_array(path, name, meta) for name in (*FILES, "done")}
    chunk, n = meta["chunk_images"], meta["num_images"]
    classes = len(meta["classes"])
    for c in range(meta["chunks"]):
        lo, hi = c * chunk, min(n, (c + 1) * chunk)
        mark = int(arrays["done"][c])
        if mark == 0:
            raise StoreError(f"teacher store {path}: chunk {c} (images {lo}-{hi - 1}) is marked "
                             "complete in meta.json but was never written")
        if mark != (1 << 32) | _chunk_crc(arrays, lo, hi):
            raise StoreError(f"teacher store {path}: chunk {c} (images {lo}-{hi - 1}) fails its "
                             "checksum: the files were modified or damaged after the build")
        ids = arrays["ids"][lo:hi]
        if ids.size and (int(ids.max()) >= classes or int(ids.min()) < 0):
            raise StoreError(f"teacher store {path}: chunk {c} holds class ids outside "
                             f"[0, {classes})")
        values = arrays["values"][lo:hi]
        if not np.isfinite(values).all():
            raise StoreError(f"teacher store {path}: chunk {c} holds non-finite values")
        boxes = arrays["boxes"][lo:hi]
        if boxes.size and ((boxes[..., 2:4] < 1).any() or (boxes[..., :2] < 0).any()
                           or not np.isin(boxes[..., 4], (0, 1)).all()):
            raise StoreError(f"teacher store {path}: chunk {c} holds invalid crop boxes")
    return meta


@dataclass
class OpenStore:
    path: Path
    meta: dict[str, Any]


def open_for_run(cfg: Config, src: Source, teacher_sha: str | None) -> OpenStore:
    """The store ``cfg.teacher_store``, verified and checked against the run, or StoreError."""
    path = Path(cfg.teacher_store)
    meta = verify(path)
    wanted = _identity(cfg, src, teacher_sha)
    # The data set's name (a path for folders) is informative only: its fingerprint identifies it.
    keys = [k for k in wanted if k != "dataset"
            and (k != "teacher_sha256" or teacher_sha is not None)]
    diffs = _differences(meta, wanted, keys)
    if cfg.method == "topk" and meta["k"] < cfg.topk:
        diffs.append(f"k: the store keeps {meta['k']} classes per crop, --topk {cfg.topk} needs "
                     "at least as many")
    if diffs:
        raise StoreError(
            f"--teacher-store {path} does not match this run: " + "; ".join(diffs)
            + ". Build a store for this run (`python -m fastkd.train store build` with the same "
            "data and teacher options) or use the matching options")
    return OpenStore(path, meta)


# -- replaying the stored crops -------------------------------------------------------------------


def slot_of(seed: int, epoch: int, index: int, crops: int) -> int:
    """The stored crop image ``index`` uses in ``epoch``: every ``crops`` consecutive epochs use
    each of its crops once, in an order drawn from (seed, cycle, index)."""
    cycle, pos = divmod(epoch, crops)
    gen = torch.Generator().manual_seed(augmentation_key(seed, cycle, index))
    return int(torch.randperm(crops, generator=gen)[pos])


class ReplayDataset(Dataset):
    """The training set as a store replays it: image ``i`` in epoch ``e`` is its stored crop
    ``slot_of(seed, e, i)`` (box and flip applied, then the rest of the transform), with the
    label and the stored teacher rows ``ids [n, k]``, ``values [n, k]``."""

    def __init__(self, src: Source, store: OpenStore, seed: int) -> None:
        self.src = src
        self.path = store.path
        self.meta = store.meta
        self.seed = seed
        self.crops = store.meta["crops"]
        self.epoch = 0
        self._arrays: dict[str, np.ndarray] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.src.images)  # type: ignore[arg-type]

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes open their own memory maps.
        return {**self.__dict__, "_arrays": None}

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {name: np.load(self.path / f"{name}.npy", mmap_mode="r")
                            for name in FILES}
        return self._arrays

    def __getitem__(self, index: int):
        a = self.arrays()
        slot = slot_of(self.seed, self.epoch, index, self.crops)
        image, label = self.src.images[index]
        x = self.src.crop.apply(image, a["boxes"][index, slot])
        if self.src.post is not None:
            x = self.src.post(x)
        ids = torch.from_numpy(np.array(a["ids"][index, slot]))
        values = torch.from_numpy(np.array(a["values"][index, slot]))
        return x, torch.as_tensor(label), ids, values


def teacher_fn(cfg: Config, meta: dict[str, Any], device: torch.device) -> Callable:
    """The teacher side of a step from the batch's stored rows: one ``fastkd.SparseTeacher`` per
    stored teacher (kd, dih), or the partial teacher of ``--topk`` classes (topk)."""
    import fastkd

    from .methods import TeacherOut
    from .topk import partial_teacher

    classes = len(meta["classes"])

    def sparse(stored) -> list[fastkd.SparseTeacher]:
        ids, values = stored
        ids = ids.to(device, non_blocking=True).to(torch.int32)
        values = values.to(device, non_blocking=True).float()
        return [fastkd.SparseTeacher(ids[:, t], values[:, t], kind="log_probs", tail="uniform")
                for t in range(ids.shape[1])]

    if cfg.method != "topk":
        return lambda stored: TeacherOut(sparse(stored))

    def partial(stored) -> TeacherOut:
        # The stored teacher as the dense logits it stands for (its k classes and the uniform
        # tail at temperature 1), then the partial teacher of --topk classes at T: the same
        # target the live teacher gives when the store keeps every class.
        ids, values, tails = sparse(stored)[0]._for_kernel(classes, torch.float64)
        dense = tails[:, None].expand(-1, classes).clone().scatter(-1, ids.long(), values)
        return TeacherOut([partial_teacher(dense, cfg.topk, cfg.temperature)])

    return partial


def check_method(cfg: Config) -> None:
    """Refuses a store for a method that needs more than the teacher's class probabilities."""
    if cfg.teacher_store is None:
        return
    if cfg.method in ("cd", "feed", "nd"):
        raise ConfigError(
            f"--teacher-store: {cfg.method} distils the teacher's feature maps, which a store "
            "does not hold (it keeps the top-k class log-probabilities of each stored crop); "
            f"train {cfg.method} with the live teacher")
    if cfg.method not in STORE_METHODS:
        raise ConfigError(f"--teacher-store: {cfg.method} has no teacher; drop --teacher-store")


# -- building -------------------------------------------------------------------------------------


class _BuildImages(Dataset):
    """Image ``i`` as its ``M`` crops ``[M, C, H, W]`` and their boxes ``[M, 5]``."""

    def __init__(self, src: Source, crops: int, seed: int) -> None:
        self.src, self.crops, self.seed = src, crops, seed

    def __len__(self) -> int:
        return len(self.src.images)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        image, _ = self.src.images[index]
        height, width = image_size(image)
        xs, boxes = [], []
        for slot in range(self.crops):
            box = self.src.crop.draw(height, width, augmentation_key(self.seed, index, slot))
            x = self.src.crop.apply(image, box)
            xs.append(self.src.post(x) if self.src.post is not None else x)
            boxes.append(box)
        return torch.stack(xs), torch.tensor(boxes, dtype=torch.int32)


class _Indices(Sampler[int]):
    def __init__(self, indices: list[int]) -> None:
        self.indices = indices

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class _Writer:
    """Writes rows of the store's files at their byte offsets and marks chunks done."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.files = {}
        for name in (*FILES, "done"):
            arr = _load_array(path, name, meta)
            row = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
            fd = os.open(path / f"{name}.npy", os.O_RDWR)
            self.files[name] = (fd, arr.offset, row, arr.dtype)
            del arr

    def write_chunk(self, c: int, lo: int, rows: dict[str, np.ndarray]) -> None:
        crc = 0
        for name in FILES:
            fd, offset, row, dtype = self.files[name]
            data = np.ascontiguousarray(rows[name], dtype=dtype).tobytes()
            crc = zlib.crc32(data, crc)
            os.pwrite(fd, data, offset + lo * row)
        for name in FILES:
            os.fsync(self.files[name][0])
        fd, offset, _, _ = self.files["done"]
        os.pwrite(fd, np.array([(1 << 32) | crc], dtype=np.int64).tobytes(), offset + 8 * c)
        os.fsync(fd)

    def close(self) -> None:
        for fd, *_ in self.files.values():
            os.close(fd)


def _create(path: Path, meta: dict[str, Any]) -> None:
    """Fresh zero-filled (sparse) files, then the metadata, marked incomplete."""
    path.mkdir(parents=True, exist_ok=True)
    for name, shape in _shapes(meta).items():
        arr = np.lib.format.open_memmap(path / f"{name}.npy", mode="w+",
                                        dtype=np.dtype(meta["dtypes"][name]), shape=shape)
        arr.flush()
        del arr
    _write_json(path / META, meta)


def _remove(path: Path) -> None:
    for name in (META, *(f"{n}.npy" for n in (*FILES, "done"))):
        (path / name).unlink(missing_ok=True)


@dataclass
class BuildResult:
    path: Path
    meta: dict[str, Any]
    images: int  # images this process's ranks processed in this build (resumed ones excluded)
    seconds: float
    images_per_s: float  # crops per second of the whole build (all ranks)


def _teachers(cfg: Config, src: Source, device: torch.device, log, d, provide, train_heads
              ) -> tuple[Callable[[torch.Tensor], list[torch.Tensor]], str, list[str],
                         dict[str, str]]:
    """The build's forward (logits of every cohort member), the teacher's sha256, the members'
    names and the sha256 of every weight set."""
    from . import teacher as teachers_mod

    classes = len(src.classes)
    paths = provide(cfg, 1, log, d)
    net = teachers_mod.build_teachers(cfg, paths, classes, src.input_shape)[0]
    sha = teacher_sha256(cfg, paths, classes, src.input_shape)
    channels_last = bool(cfg.channels_last)
    from .runtime import prepare

    prepare(net, device, channels_last)
    if cfg.method != "dih":
        return (lambda x: [net(x)[1]]), sha, teacher_names(cfg), {cfg.teacher: sha}
    heads = train_heads(cfg, log)
    prepare(heads, device, channels_last)
    heads.eval()

    def cohort(x):
        feats, logits = net(x)
        return [*(h(f.flatten(1)) for h, f in zip(heads, feats, strict=True)), logits]

    names = teacher_names(cfg, len(heads))
    return cohort, sha, names, {cfg.teacher: sha, "heads": weights_sha256(heads.state_dict())}


def build_store(cfg: Config, d: distributed.Dist, device: torch.device, log, provide,
                train_heads) -> BuildResult:
    """The build on this rank (``cfg`` resolved, the process group joined): ``provide`` gives the
    teacher's weight files, ``train_heads`` DIH's trained heads (``fastkd.train.store_build``)."""
    from .runtime import autocast, to_device

    t0 = time.perf_counter()
    path = Path(cfg.output)
    src = source(cfg)
    classes = len(src.classes)
    if cfg.topk > classes:
        raise ConfigError(f"--topk {cfg.topk}: the data has {classes} classes")
    if cfg.channels_last is None:
        cfg.channels_last = device.type == "cuda"
    forward, sha, names, shas = _teachers(cfg, src, device, log, d, provide, train_heads)
    meta = _build_meta(cfg, src, sha, names, shas)
    # Rank 0 decides: resume, refuse, or create.
    status = None
    if d.is_main:
        status = _prepare_dir(cfg, path, meta, log)
    status = distributed.broadcast_object(d, status)
    if status.startswith("error:"):
        raise StoreError(status[len("error:"):])
    if status == "complete":
        meta = _read_meta(path)
        log(f"teacher store {path} is complete ({meta['num_images']} images x {meta['crops']} "
            "crops); nothing to do")
        return BuildResult(path, meta, 0, time.perf_counter() - t0, 0.0)
    distributed.barrier(d)
    meta = _read_meta(path)
    done = np.load(path / "done.npy", mmap_mode="r")
    chunk, n, crops = meta["chunk_images"], meta["num_images"], meta["crops"]
    todo = [c for c in range(meta["chunks"]) if c % d.world_size == d.rank and done[c] == 0]
    total_todo = sum(1 for c in range(meta["chunks"]) if done[c] == 0)
    del done
    if total_todo < meta["chunks"]:
        log(f"resuming teacher store {path}: {meta['chunks'] - total_todo} of {meta['chunks']} "
            "chunks already built")
    indices = [i for c in todo for i in range(c * chunk, min(n, (c + 1) * chunk))]
    loader = DataLoader(_BuildImages(src, crops, cfg.seed), batch_size=chunk,
                        sampler=_Indices(indices), num_workers=cfg.workers,
                        pin_memory=device.type == "cuda")
    writer = _Writer(path, meta)
    progress = (cfg.progress if cfg.progress is not None else sys.stderr.isatty()) and d.is_main
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(indices) * crops, unit="img", unit_scale=True, dynamic_ncols=True,
                   desc=f"store build (rank 0 of {d.world_size})", smoothing=0.1)
    k = meta["k"]
    id_type = np.dtype(meta["dtypes"]["ids"])
    t_start = time.perf_counter()
    teacher_s = 0.0
    done_images = 0
    try:
        for c, (x, boxes) in zip(todo, loader, strict=True):
            lo = c * chunk
            b = x.shape[0]
            ids = np.empty((b, crops, len(names), k), dtype=id_type)
            values = np.empty((b, crops, len(names), k), dtype=np.float16)
            t_t = time.perf_counter()
            with torch.inference_mode(), autocast(cfg, device):
                for slot in range(crops):
                    xs = to_device(x[:, slot].contiguous(), device, bool(cfg.channels_last))
                    for t, logits in enumerate(forward(xs)):
                        log_p = torch.log_softmax(logits.float(), dim=-1)
                        top, top_ids = log_p.topk(k, dim=-1)
                        ids[:, slot, t] = top_ids.cpu().numpy().astype(id_type)
                        values[:, slot, t] = top.cpu().numpy().astype(np.float16)
            teacher_s += time.perf_counter() - t_t
            writer.write_chunk(c, lo, {"boxes": boxes.numpy(), "ids": ids, "values": values})
            done_images += b
            if bar is not None:
                bar.update(b * crops)
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t_start
    counts = torch.tensor([float(done_images), seconds, teacher_s], dtype=torch.float64)
    distributed.all_reduce_sum(d, counts)
    distributed.barrier(d)
    images_all, _, teacher_all = counts.tolist()
    rate = images_all * crops / max(seconds, 1e-9)
    if d.is_main:
        meta = _finalise(path, meta, {
            "world_size": d.world_size, "images_built": int(images_all), "seconds": seconds,
            "crops_per_s": rate,
            "teacher_crops_per_s": images_all * crops / max(teacher_all, 1e-9) * d.world_size,
            "device": str(device),
        })
        size = sum((path / f"{f}.npy").stat().st_size for f in FILES)
        log(f"teacher store {path}: {n} images x {crops} crops, k={k}, {len(names)} teacher(s), "
            f"{size / 1e6:.1f} MB; built {int(images_all)} images in {seconds:.1f}s: "
            f"{rate:.0f} crops/s ({d.world_size} rank(s) on {device})")
    distributed.barrier(d)
    meta = distributed.broadcast_object(d, meta)
    return BuildResult(path, meta, done_images, seconds, rate)


def _prepare_dir(cfg: Config, path: Path, meta: dict[str, Any], log) -> str:
    """'create', 'resume' or 'complete' (or 'error:<message>'), after creating fresh files."""
    if (path / META).exists():
        try:
            saved = _read_meta(path)
        except StoreError as e:
            if not cfg.overwrite:
                return f"error:{e}; pass --overwrite to replace it"
            saved = None
        if saved is not None:
            keys = [k for k in meta if k not in ("complete", "build", "dataset")]
            diffs = _differences(saved, meta, keys)
            if diffs and not cfg.overwrite:
                return (f"error:--output {path} holds a teacher store built with other settings "
                        f"({'; '.join(diffs)}); pass --overwrite to replace it, or another "
                        "--output")
            if not diffs and saved.get("complete") and not cfg.overwrite:
                return "complete"
            if not diffs and not cfg.overwrite:
                return "resume"
        log(f"--overwrite: replacing the teacher store in {path}")
        _remove(path)
    _create(path, meta)
    return "create"


def _finalise(path: Path, meta: dict[str, Any], build_info: dict[str, Any]) -> dict[str, Any]:
    done = np.load(path / "done.npy", mmap_mode="r")
    missing = int((done == 0).sum())
    del done
    if missing:
        raise StoreError(f"teacher store {path}: {missing} chunks are not marked done after the "
                         "build; rerun it")
    meta = {**meta, "complete": True, "build": build_info}
    _write_json(path / META, meta)
    return meta


# -- the command line -----------------------------------------------------------------------------


def info(path: str) -> dict[str, Any]:
    """``store info DIR``: verifies the store and returns a summary of its metadata."""
    meta = verify(path)
    size = sum((Path(path) / f"{f}.npy").stat().st_size for f in FILES)
    return {
        "path": str(path), "teachers": meta["teachers"], "teacher_sha256": meta["teacher_sha256"],
        "images": meta["num_images"], "crops": meta["crops"], "k": meta["k"],
        "classes": len(meta["classes"]), "dataset": meta["dataset"],
        "transform": meta["transform"], "ids": meta["dtypes"]["ids"], "bytes": size,
        "build": meta.get("build"),
    }
