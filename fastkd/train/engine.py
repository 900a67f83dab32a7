"""The training loop: one function, :func:`train`, from a configuration to a trained student.

Per step: the teacher side runs in eval mode under ``torch.inference_mode`` (and autocast), the
phase's module (student, plus connectors / transforms / heads) runs forward -- wrapped in DDP under
torchrun -- the method's loss goes through fastkd's ops, then backward and the optimizer step. The
learning rate is set every step from a pure function of the step (warm-up, then cosine / step /
constant), so resuming needs only the step counter.

Reliability: a checkpoint at the end of every epoch and every ``--checkpoint-every`` steps
(atomic); ``--resume`` restores modules, optimizer, scaler, RNG states, position and the unfinished
epoch's sums, and the sampler restarts the epoch where it stopped; SIGINT/SIGTERM finish the
current step, checkpoint and raise :class:`Interrupted`; a non-finite loss raises
:class:`NonFiniteLoss` without overwriting the last good checkpoint. Host synchronisation is kept
off the GPU's critical path: losses and accuracies accumulate on the device and are read at
``--log-interval`` and epoch ends; per-step synchronisation happens only with ``--profile-steps``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..data import (
    BatchedTensorDataset,
    ResumableDistributedSampler,
    SeededAugmentation,
    ShardSampler,
    SyntheticImages,
    build_imagefolder,
    collate_batch,
    load_digits_split,
)
from . import checkpoint as ckpt
from . import distributed, methods
from .config import SYNTHETIC, Config, ConfigError, resolve
from .metrics import MetricsLog, plot_history, table
from .models import StagedNet, build_model, check_model_name

CHECKPOINT = "checkpoint.pt"
STUDENT = "student.pt"


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM: a checkpoint was saved and the run stopped."""

    def __init__(self, message: str, signum: int | None) -> None:
        super().__init__(message)
        self.signum = signum


@dataclass
class RunResult:
    output: Path
    history: list[dict[str, Any]]
    val_top1: float | None
    best_val_top1: float | None
    time_s: float
    train_time_s: float
    images_per_s: float
    student_path: Path | None


@dataclass
class Data:
    train: Dataset
    val: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]
    augmented: bool


def load_data(cfg: Config) -> Data:
    """The training and validation sets ``cfg`` names (embedded digits, synthetic, or a folder)."""
    if cfg.data is None:
        train, val = load_digits_split(cfg.train_fraction)
        return Data(BatchedTensorDataset(train.images, train.labels),
                    BatchedTensorDataset(val.images, val.labels), 10, (1, 8, 8), False)
    if cfg.data == SYNTHETIC:
        shape = (3, cfg.image_size, cfg.image_size)
        return Data(
            SyntheticImages(cfg.synthetic_images, cfg.synthetic_classes, shape, cfg.seed),
            SyntheticImages(max(1, cfg.synthetic_images // 10), cfg.synthetic_classes, shape,
                            cfg.seed + 1),
            cfg.synthetic_classes, shape, False,
        )
    try:
        train, val, classes = build_imagefolder(cfg.data, cfg.image_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Data(SeededAugmentation(train, cfg.seed), val, len(classes),
                (3, cfg.image_size, cfg.image_size), True)


class _StopFlag:
    """Installs SIGINT/SIGTERM handlers that ask the loop to stop after the current step; a
    second signal falls back to the default behaviour. Restores the previous handlers on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if _is_main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _device(cfg: Config, d: distributed.Dist) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def resolve_device(cfg: Config) -> torch.device:
    """This process's device; fills in ``--amp auto`` for it (in place)."""
    device = _device(cfg, distributed.Dist(local_rank=int(os.environ.get("LOCAL_RANK", "0"))))
    if cfg.amp == "auto":
        cfg.amp = "bf16" if device.type == "cuda" else "off"
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device; on the CPU use --amp bf16 or off")
    return device


def _autocast(cfg: Config, device: torch.device):
    if cfg.amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _optimizer(cfg: Config, modules: list[nn.Module], lr: float) -> torch.optim.Optimizer:
    decay, no_decay, seen = [], [], set()
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    import timm.optim

    if cfg.optimizer == "lars":
        return timm.optim.Lars(groups, lr=lr, momentum=cfg.momentum)
    return timm.optim.Lamb(groups, lr=lr)


def lr_at(cfg: Config, base_lr: float, epochs: int, steps_per_epoch: int, step: int) -> float:
    """Learning rate at optimizer step ``step`` (0-based) of a phase of ``epochs`` epochs."""
    total = epochs * steps_per_epoch
    warm = min(round(cfg.warmup_epochs * steps_per_epoch), total)
    if step < warm:
        return base_lr * (step + 1) / warm
    if cfg.lr_schedule == "constant":
        return base_lr
    if cfg.lr_schedule == "step":
        epoch = step // steps_per_epoch
        return base_lr * cfg.lr_gamma ** sum(epoch >= m for m in cfg.lr_milestones)
    t = (step - warm) / max(1, total - warm)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))


class _Profiler:
    """Wall time per section of the first ``steps`` steps, synchronising the device."""

    SECTIONS = ("data", "teacher_forward", "student_forward", "distillation_loss",
                "backward_step")

    def __init__(self, steps: int, device: torch.device) -> None:
        self.steps = steps
        self.device = device
        self.totals = dict.fromkeys(self.SECTIONS, 0.0)
        self.count = 0
        self.images = 0
        self._t = 0.0

    @property
    def active(self) -> bool:
        return self.count < self.steps

    def start(self) -> None:
        if self.active:
            self._sync()
            self._t = time.perf_counter()

    def mark(self, section: str) -> None:
        if self.active:
            self._sync()
            now = time.perf_counter()
            self.totals[section] += now - self._t
            self._t = now

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def report(self) -> dict[str, Any]:
        total = sum(self.totals.values())
        return {
            "steps": self.count,
            "images": self.images,
            "images_per_s": self.images / total if total else 0.0,
            "ms_per_step": {k: 1e3 * v / max(1, self.count) for k, v in self.totals.items()},
            "share": {k: v / total if total else 0.0 for k, v in self.totals.items()},
        }


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    if channels_last and x.dim() == 4:
        return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


def _prepare(module: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    module.to(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    return module


def _teacher_models(cfg: Config, data: Data, log: Callable[[str], None],
                    d: distributed.Dist) -> list[StagedNet]:
    """The frozen teachers, weights loaded (trained and cached first on the embedded data)."""
    from .teacher import cached_teacher_paths

    method = cfg.method
    count = cfg.feed_teachers if method == "feed" else 1
    with_features = methods.needs_features(method, "teacher")
    if cfg.data == SYNTHETIC and not cfg.teacher_weights:
        log(f"--data synthetic: {count} randomly initialised teacher(s), for throughput only")
        paths: list[str | None] = [None] * count
    elif cfg.teacher_weights:
        paths = list(cfg.teacher_weights)
    else:
        paths = [str(p) for p in cached_teacher_paths(cfg, count, log, d)]
    teachers = []
    for i, path in enumerate(paths):
        torch.manual_seed(cfg.seed + 1000 + i)
        net = build_model(cfg.teacher, data.num_classes, with_features=with_features,
                          input_shape=data.input_shape)
        if path is not None:
            net.load_weights(ckpt.read_weights(path), f"--teacher-weights {path}")
        net.eval().requires_grad_(False)
        teachers.append(net)
    return teachers


def train(cfg: Config, *, log: Callable[[str], None] | None = None,
          quiet: bool = False) -> RunResult:
    """Runs one training job described by ``cfg`` (resolved here). See the module docstring."""
    world = distributed.env_world_size()
    cfg = resolve(cfg, world_size=world)
    if cfg.method is None:
        raise ConfigError("train() needs a --method")
    own_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    device = resolve_device(cfg)
    d = distributed.init(device.type)
    threads = torch.get_num_threads()
    try:
        return _Run(cfg, d, device, log, quiet).fit()
    finally:
        torch.set_num_threads(threads)
        if own_group:
            distributed.shutdown(d)


class _Run:
    def __init__(self, cfg: Config, d: distributed.Dist, device: torch.device,
                 log: Callable[[str], None] | None, quiet: bool) -> None:
        self.cfg = cfg
        self.d = d
        self.device = device
        self.quiet = quiet
        self._log = log or (lambda s: print(s, flush=True))
        self.output = Path(cfg.output)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        elif cfg.data is None:
            # The digits' 8x8 convolutions gain nothing from intra-op threads, and on shared cores
            # the threads' barriers cost several times the work.
            torch.set_num_threads(1)
        elif d.enabled and device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.world_size))
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.channels_last = (
            cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
        )
        self.progress = (
            cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        ) and d.is_main and not quiet

    def log(self, message: str) -> None:
        if self.d.is_main and not self.quiet:
            self._log(message)

    # -- set-up -------------------------------------------------------------------------------

    def _check_output(self) -> Path | None:
        """The checkpoint to resume from, or None; refuses to clobber an earlier run."""
        cfg = self.cfg
        existing = self.output / CHECKPOINT
        if cfg.resume is not None:
            return existing if cfg.resume == "auto" else Path(cfg.resume)
        if existing.exists() and not cfg.overwrite:
            raise ConfigError(
                f"--output {self.output} already holds a checkpoint; pass --resume to continue "
                "that run, --overwrite to replace it, or another --output"
            )
        return None

    def _build(self) -> None:
        cfg = self.cfg
        embedded = cfg.data is None
        check_model_name(cfg.student, embedded, "student")
        if cfg.method != "scratch":
            check_model_name(cfg.teacher, embedded, "teacher")
        self.resume_path = self._check_output()
        self.data = load_data(cfg)
        methods.check(cfg, self.data.num_classes)
        per_rank = cfg.batch_size // self.d.world_size
        if len(self.data.train) // self.d.world_size < per_rank:
            raise ConfigError(
                f"--batch-size {cfg.batch_size}: the training set has {len(self.data.train)} "
                f"images, fewer than one batch per rank ({per_rank} x {self.d.world_size} ranks)"
            )
        self.teachers = [] if cfg.method == "scratch" else _teacher_models(
            cfg, self.data, self._log if not self.quiet else (lambda s: None), self.d)
        torch.manual_seed(cfg.seed)
        student = build_model(
            cfg.student, self.data.num_classes,
            with_features=methods.needs_features(cfg.method, "student"),
            input_shape=self.data.input_shape,
        )
        self.student = student
        self.plan = methods.build(methods.Context(
            cfg, student, self.teachers, self.data.num_classes, self.data.input_shape))
        for module in self.plan.modules.values():
            _prepare(module, self.device, self.channels_last)
        for t in self.teachers:
            _prepare(t, self.device, self.channels_last)
        self.teacher_fns = {}
        # Distinct streams per rank for anything random after initialisation (DDP keeps weights
        # identical by broadcasting rank 0's at wrap time).
        torch.manual_seed(cfg.seed + self.d.rank)

        self.per_rank_batch = per_rank
        self.sampler = ResumableDistributedSampler(
            self.data.train, self.d.world_size, self.d.rank, cfg.seed)
        pin = self.device.type == "cuda"
        # In-memory data sets hand over whole batches (one gather instead of a per-image collate).
        collate = collate_batch if hasattr(self.data.train, "__getitems__") else None
        # Own generator: creating a loader iterator must not draw from the global RNG stream, or
        # a resumed run would see a different stream from an uninterrupted one.
        self.train_loader = DataLoader(
            self.data.train, batch_size=per_rank, sampler=self.sampler,
            num_workers=cfg.workers, pin_memory=pin, drop_last=True,
            generator=torch.Generator().manual_seed(cfg.seed), collate_fn=collate,
        )
        self.val_loader = DataLoader(
            self.data.val, batch_size=max(per_rank, 256),
            sampler=ShardSampler(len(self.data.val), self.d.world_size, self.d.rank),
            num_workers=cfg.workers, pin_memory=pin, collate_fn=collate,
        )
        full = len(self.sampler) // per_rank
        self.steps_per_epoch = min(full, cfg.max_steps_per_epoch or full)

    def _wrap(self, module: nn.Module) -> nn.Module:
        if self.d.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            module = DDP(module, device_ids=ids)
        if self.cfg.compile:
            module = torch.compile(module)
        return module

    def _teacher_fn(self, phase: methods.Phase):
        fn = phase.teacher
        if fn is None or not self.cfg.compile:
            return fn
        if id(fn) not in self.teacher_fns:
            self.teacher_fns[id(fn)] = torch.compile(fn)
        return self.teacher_fns[id(fn)]

    def _start_phase(self, index: int, saved: dict[str, Any] | None) -> None:
        cfg = self.cfg
        phase = self.plan.phases[index]
        for m in self.plan.modules.values():
            m.requires_grad_(False).eval()
        for m in phase.trainable:
            m.requires_grad_(True).train()
        peak = cfg.lr if phase.lr is None else phase.lr
        base_lr = peak * (cfg.batch_size / cfg.lr_base_batch if cfg.lr_scaling == "linear"
                          else 1.0)
        self.base_lr = base_lr
        self.optimizer = _optimizer(cfg, phase.trainable, base_lr)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        if saved is not None and saved.get("optimizer_phase") == index:
            self.optimizer.load_state_dict(saved["optimizer"])
            if self.scaler is not None and saved.get("scaler") is not None:
                self.scaler.load_state_dict(saved["scaler"])
        self.train_module = self._wrap(phase.module)
        self.phase_index = index

    def _phase_of(self, epoch: int) -> tuple[int, int]:
        for i, phase in enumerate(self.plan.phases):
            if epoch < phase.epochs:
                return i, epoch
            epoch -= phase.epochs
        raise AssertionError("epoch beyond the plan")

    # -- checkpoints --------------------------------------------------------------------------

    def _state(self, epoch: int, step: int, sums: dict[str, torch.Tensor] | None,
               finished: bool) -> dict[str, Any] | None:
        rngs = [ckpt.rng_state()]
        if self.d.enabled:
            gathered: list[Any] = [None] * self.d.world_size
            torch.distributed.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if not self.d.is_main:
            return None
        return {
            "format": ckpt.FORMAT,
            "version": ckpt.VERSION,
            "config": self.cfg.to_dict(),
            "world_size": self.d.world_size,
            "modules": {k: m.state_dict() for k, m in self.plan.modules.items()},
            "model": self.student.weights(),
            "position": {"epoch": epoch, "step": step, "global_step": self.global_step},
            "optimizer": self.optimizer.state_dict(),
            "optimizer_phase": self.phase_index,
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "rng": rngs,
            "epoch_sums": None if sums is None else {k: v.cpu() for k, v in sums.items()},
            "history": list(self.metrics.history),
            "elapsed_s": self.elapsed(),
            "train_time_s": self.train_time,
            "train_images": self.train_images,
            "finished": finished,
        }

    def _save(self, epoch: int, step: int, sums, finished: bool = False) -> None:
        state = self._state(epoch, step, sums, finished)
        if state is not None:
            ckpt.atomic_save(state, self.output / CHECKPOINT)
        distributed.barrier(self.d)

    def _restore(self, path: Path) -> dict[str, Any]:
        saved = ckpt.load(path)
        ckpt.check_matches(saved["config"], self.cfg.to_dict(), str(path))
        modules = saved.get("modules", {})
        if set(modules) != set(self.plan.modules):
            raise ckpt.CheckpointError(
                f"--resume: {path} holds modules {sorted(modules)}, this run trains "
                f"{sorted(self.plan.modules)}"
            )
        for name, module in self.plan.modules.items():
            try:
                module.load_state_dict(modules[name])
            except RuntimeError as e:
                raise ckpt.CheckpointError(
                    f"--resume: {path}: the saved {name} does not fit this run's model ({e})"
                ) from None
        rngs = saved["rng"]
        if saved.get("world_size") != self.d.world_size:
            self.log(f"warning: {path} was written by {saved.get('world_size')} ranks, resuming "
                     f"on {self.d.world_size}: the data order differs from an uninterrupted run")
        ckpt.set_rng_state(rngs[self.d.rank] if self.d.rank < len(rngs) else rngs[0])
        return saved

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    # -- the loop -----------------------------------------------------------------------------

    def fit(self) -> RunResult:
        cfg = self.cfg
        self.t_start = time.perf_counter()
        self.elapsed_before = 0.0
        self.train_time = 0.0
        self.train_images = 0
        self._build()
        if self.d.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
        saved = self._restore(self.resume_path) if self.resume_path is not None else None
        history = list(saved["history"]) if saved else []
        self.metrics = MetricsLog(self.output, self.d.is_main, history)
        epoch, step, self.global_step = 0, 0, 0
        sums = None
        if saved is not None:
            pos = saved["position"]
            epoch, step, self.global_step = pos["epoch"], pos["step"], pos["global_step"]
            sums = saved["epoch_sums"]
            self.elapsed_before = saved["elapsed_s"]
            self.train_time = saved["train_time_s"]
            self.train_images = saved["train_images"]
            self.log(f"resuming {self.resume_path} at epoch {epoch + 1}, step {step}")
        if self.d.is_main:
            (self.output / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        total_epochs = sum(p.epochs for p in self.plan.phases)
        desc = methods.describe(cfg)
        self.log(
            f"{cfg.method}: {cfg.student} <- "
            f"{cfg.teacher if cfg.method != 'scratch' else '(no teacher)'} | "
            + ", ".join(f"{k}={v}" for k, v in desc.items() if k != "method")
            + f" | {len(self.data.train)} train / {len(self.data.val)} val images, "
            f"{self.steps_per_epoch} steps/epoch, {self.d.world_size} rank(s) on {self.device}"
        )
        self.profiler = _Profiler(cfg.profile_steps, self.device)
        self.steps_this_process = 0
        phase_started = None
        with _StopFlag() as stop:
            self.stop = stop
            while epoch < total_epochs:
                index, local_epoch = self._phase_of(epoch)
                if phase_started != index:
                    self._start_phase(index, saved)
                    phase_started = index
                    saved = None
                self._run_epoch(epoch, local_epoch, step, sums, total_epochs)
                epoch, step, sums = epoch + 1, 0, None
        return self._finish()

    def _new_sums(self) -> dict[str, torch.Tensor]:
        z = lambda: torch.zeros((), dtype=torch.float64, device=self.device)  # noqa: E731
        return {"loss": z(), "correct": z(), "count": z(), "rows": z(), "bad": z()}

    def _check(self, sums: dict[str, torch.Tensor], epoch: int, step: int) -> None:
        """Stops on a non-finite loss (any rank) or a signal (any rank)."""
        flags = torch.stack([
            sums["bad"].clamp(max=1.0),
            torch.tensor(1.0 if self.stop.signum is not None else 0.0, dtype=torch.float64,
                         device=self.device),
            torch.tensor(1.0 if self._stop_steps() else 0.0, dtype=torch.float64,
                         device=self.device),
        ])
        if self.d.enabled:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        bad, signalled, step_limit = (bool(v) for v in flags.tolist())
        if bad:
            last = self.output / CHECKPOINT
            keep = (f"the last good checkpoint {last} is kept" if last.exists()
                    else "no checkpoint was written yet")
            raise NonFiniteLoss(
                f"the {self.plan.phases[self.phase_index].name} loss of {self.cfg.method} became "
                f"NaN or infinite at epoch {epoch + 1}, step {step}; {keep}. Try a lower --lr, "
                "--warmup-epochs, or --amp off"
            )
        if signalled or step_limit:
            self._save(epoch, step, sums)
            name = (signal.Signals(self.stop.signum).name if self.stop.signum is not None
                    else None)
            why = f"{name} received" if name else f"--stop-after-steps {self.cfg.stop_after_steps}"
            raise Interrupted(
                f"{why}: checkpoint saved at epoch {epoch + 1}, step {step} to "
                f"{self.output / CHECKPOINT}; continue with --resume",
                self.stop.signum,
            )

    def _stop_steps(self) -> bool:
        return (self.cfg.stop_after_steps is not None
                and self.steps_this_process >= self.cfg.stop_after_steps)

    def _batches(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        remaining = self.steps_per_epoch - start
        for i, batch in enumerate(self.train_loader):
            if i >= remaining:
                break
            yield batch

    def _run_epoch(self, epoch: int, local_epoch: int, start: int, sums, total_epochs: int):
        cfg = self.cfg
        phase = self.plan.phases[self.phase_index]
        teacher_fn = self._teacher_fn(phase)
        module = self.train_module
        self.sampler.set_position(epoch, start * self.per_rank_batch)
        if self.data.augmented:
            self.data.train.set_epoch(epoch)
        sums = self._new_sums() if sums is None else {
            k: v.to(self.device) for k, v in sums.items()}
        cpu = self.device.type == "cpu"
        check_every = 1 if cpu else cfg.log_interval
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.steps_per_epoch, initial=start, leave=False, dynamic_ncols=True,
                       desc=f"epoch {epoch + 1}/{total_epochs} {phase.name}")
        t0 = epoch_t0 = time.perf_counter()
        images = epoch_images = 0
        step = start
        prof = self.profiler
        prof.start()
        for x, y in self._batches(start):
            x = _to_device(x, self.device, self.channels_last)
            y = y.to(self.device, non_blocking=True)
            lr = lr_at(cfg, self.base_lr, phase.epochs, self.steps_per_epoch,
                       local_epoch * self.steps_per_epoch + step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            prof.mark("data")
            with _autocast(cfg, self.device):
                tout = None
                if teacher_fn is not None:
                    with torch.inference_mode():
                        tout = teacher_fn(x)
                prof.mark("teacher_forward")
                out = module(x, tout)
                prof.mark("student_forward")
                loss, loss_parts = phase.loss(out, tout, y, local_epoch + 1)
                prof.mark("distillation_loss")
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            prof.mark("backward_step")
            if prof.active:
                prof.count += 1
                prof.images += x.shape[0] * self.d.world_size
                if not prof.active:
                    self._report_profile()
            with torch.no_grad():
                detached = loss.detach().double()
                finite = torch.isfinite(detached)
                sums["bad"] += (~finite).double()
                sums["loss"] += torch.where(finite, detached, 0.0) * x.shape[0]
                sums["rows"] += x.shape[0]
                logits = out.get("logits")
                if logits is not None:
                    sums["correct"] += (logits.argmax(-1) == y).sum().double()
                    sums["count"] += y.shape[0]
                for name, value in loss_parts.items():
                    key = "part_" + name
                    if key not in sums:
                        sums[key] = torch.zeros((), dtype=torch.float64, device=self.device)
                    sums[key] += value.double() * x.shape[0]
            images += x.shape[0]
            epoch_images += x.shape[0]
            step += 1
            self.global_step += 1
            self.steps_this_process += 1
            if bar is not None:
                bar.update(1)
                if step % cfg.log_interval == 0:
                    bar.set_postfix(loss=f"{(sums['loss'] / sums['rows']).item():.4f}",
                                    lr=f"{lr:.3g}")
            every = cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0
            if step % check_every == 0 or every or self.stop.signum is not None \
                    or self._stop_steps():
                self.train_time += time.perf_counter() - t0
                self.train_images += images * self.d.world_size
                t0, images = time.perf_counter(), 0
                self._check(sums, epoch, step)
                if every and step < self.steps_per_epoch:
                    self._save(epoch, step, sums)
            prof.start()
        if bar is not None:
            bar.close()
        self.train_time += time.perf_counter() - t0
        self.train_images += images * self.d.world_size
        train_time = time.perf_counter() - epoch_t0
        self._check(sums, epoch, step)
        # The rate of the epoch's last step (also when a resumed epoch had no step left to run).
        lr = lr_at(cfg, self.base_lr, phase.epochs, self.steps_per_epoch,
                   (local_epoch + 1) * self.steps_per_epoch - 1)
        row = self._epoch_row(epoch, local_epoch, phase, sums, lr)
        row["epoch_time_s"] = time.perf_counter() - epoch_t0
        row["images_per_s"] = epoch_images * self.d.world_size / max(train_time, 1e-9)
        self.metrics.append(row)
        self.log(self._epoch_line(row, total_epochs))
        self._save(epoch + 1, 0, None, finished=epoch + 1 == total_epochs)

    def _report_profile(self) -> None:
        report = self.profiler.report()
        if self.d.is_main:
            (self.output / "profile.json").write_text(json.dumps(report, indent=1))
        rows = [[k, f"{report['ms_per_step'][k]:.2f}", f"{100 * report['share'][k]:.1f}"]
                for k in _Profiler.SECTIONS]
        self.log(f"profile of {report['steps']} steps ({report['images_per_s']:.0f} images/s "
                 "with synchronisation):\n" + table(["section", "ms/step", "%"], rows))

    def _evaluate(self, phase: methods.Phase) -> dict[str, float]:
        for m in self.plan.modules.values():
            m.eval()
        names: list[str] | None = None
        totals: torch.Tensor | None = None
        with torch.inference_mode(), _autocast(self.cfg, self.device):
            for x, y in self.val_loader:
                x = _to_device(x, self.device, self.channels_last)
                y = y.to(self.device, non_blocking=True)
                outs = phase.evaluate(x)
                if names is None:
                    names = list(outs)
                    totals = torch.zeros(3 * len(names) + 1, dtype=torch.float64,
                                         device=self.device)
                vals = []
                for n in names:
                    logits = outs[n].float()
                    k = min(5, logits.shape[-1])
                    top = logits.topk(k, dim=-1).indices
                    vals += [
                        F.cross_entropy(logits, y, reduction="sum").double(),
                        (top[:, 0] == y).sum().double(),
                        (top == y[:, None]).any(-1).sum().double(),
                    ]
                vals.append(torch.tensor(float(y.shape[0]), dtype=torch.float64,
                                         device=self.device))
                totals += torch.stack(vals)
        for m in self.plan.phases[self.phase_index].trainable:
            m.train()
        if names is None:
            totals = torch.zeros(1, dtype=torch.float64, device=self.device)
            names = []
        distributed.all_reduce_sum(self.d, totals)
        t = totals.tolist()
        n = max(1.0, t[-1])
        result = {}
        for i, name in enumerate(names):
            prefix = "val" if name == "student" else f"val_{name}"
            result[f"{prefix}_loss"] = t[3 * i] / n
            result[f"{prefix}_top1"] = 100.0 * t[3 * i + 1] / n
            result[f"{prefix}_top5"] = 100.0 * t[3 * i + 2] / n
        return result

    def _epoch_row(self, epoch: int, local_epoch: int, phase: methods.Phase, sums, lr):
        keys = sorted(sums)
        packed = torch.stack([sums[k] for k in keys])
        distributed.all_reduce_sum(self.d, packed)
        s = dict(zip(keys, packed.tolist(), strict=True))
        rows = max(1.0, s["rows"])
        row: dict[str, Any] = {
            "epoch": epoch + 1, "phase": phase.name, "phase_epoch": local_epoch + 1, "lr": lr,
            "train_loss": s["loss"] / rows,
            "train_top1": 100.0 * s["correct"] / s["count"] if s["count"] else None,
        }
        for k in keys:
            if k.startswith("part_"):
                row["train_" + k[len("part_"):]] = s[k] / rows
        last_of_phase = local_epoch + 1 == phase.epochs
        if (local_epoch + 1) % self.cfg.eval_every == 0 or last_of_phase:
            row.update(self._evaluate(phase))
        return row

    def _epoch_line(self, row: dict[str, Any], total_epochs: int) -> str:
        parts = [f"epoch {row['epoch']:>3}/{total_epochs} {row['phase']:<7}",
                 f"loss {row['train_loss']:.4f}"]
        if row.get("train_top1") is not None:
            parts.append(f"train top1 {row['train_top1']:5.1f}%")
        if row.get("val_top1") is not None:
            parts.append(f"val top1 {row['val_top1']:5.1f}% (loss {row['val_loss']:.4f})")
        heads = [f"{k[4:-5]} {v:.1f}%" for k, v in row.items()
                 if k.startswith("val_head") and k.endswith("_top1")]
        if heads:
            parts.append("val " + ", ".join(heads))
        parts.append(f"{row['epoch_time_s']:.2f}s")
        return " | ".join(parts)

    def _finish(self) -> RunResult:
        history = self.metrics.history
        student_path = None
        if self.d.is_main:
            student_path = self.output / STUDENT
            ckpt.atomic_save(self.student.weights(), student_path)
        if self.d.is_main and self.cfg.plot:
            plot_history(history, self.output / "plot.png",
                         f"{self.cfg.method}: {self.cfg.student}, seed {self.cfg.seed}")
        self.metrics.close()
        student_rows = [r for r in history if r.get("val_top1") is not None
                        and r["phase"] == "student"]
        final = student_rows[-1]["val_top1"] if student_rows else None
        best = max((r["val_top1"] for r in student_rows), default=None)
        ips = self.train_images / self.train_time if self.train_time else 0.0
        result = RunResult(self.output, history, final, best, self.elapsed(), self.train_time,
                           ips, student_path)
        if not self.quiet and self.d.is_main:
            rows = [[self.cfg.method, _pct(final), _pct(best), len(history),
                     f"{result.time_s:.1f}", f"{ips:.0f}"]]
            self.log(table(["method", "val top1 %", "best %", "epochs", "time s", "images/s"],
                           rows))
            self.log(f"wrote {self.output}/ (checkpoint.pt, student.pt, metrics.csv, "
                     "metrics.json, plot.png, tb/)")
        distributed.barrier(self.d)
        return result


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"

