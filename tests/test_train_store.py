"""Teacher-output store (fastkd.train.store) on the embedded digits: build, exact replay, training
and resuming from a store, refusals of mismatched and damaged stores, resumed builds."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from test_train_reliability import assert_same_run

from fastkd.train import Config, ConfigError, Interrupted, train
from fastkd.train import store as st
from fastkd.train.__main__ import main
from fastkd.train.config import resolve
from fastkd.train.runtime import resolve_device
from fastkd.train.store_build import build


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "fastkd-cache")


def build_cfg(output, cache_dir, **kw):
    # 126 training images in chunks of 32: 4 chunks.
    values = dict(method="kd", output=str(output), crops=3, topk=4, train_fraction=0.1,
                  batch_size=32, teacher_epochs=1, cache_dir=cache_dir, progress=False,
                  threads=1)
    values.update(kw)
    return Config(**values)


def run_cfg(store_dir, output, cache_dir, method="kd", **kw):
    values = dict(method=method, teacher_store=str(store_dir), output=str(output), epochs=3,
                  train_fraction=0.1, batch_size=32, teacher_epochs=1, cache_dir=cache_dir,
                  plot=False, threads=1, dih_head_epochs=1)
    values.update(kw)
    return Config(**values)


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory, cache_dir):
    path = tmp_path_factory.mktemp("store") / "digits"
    build(build_cfg(path, cache_dir), log=lambda s: None)
    return path


def store_files(path):
    return {name: np.load(path / f"{name}.npy") for name in (*st.FILES, "done")}


def assert_same_store(a, b):
    fa, fb = store_files(a), store_files(b)
    for name in fa:
        assert fa[name].dtype == fb[name].dtype and np.array_equal(fa[name], fb[name]), name
    ma = json.loads((a / "meta.json").read_text())
    mb = json.loads((b / "meta.json").read_text())
    ma.pop("build"), mb.pop("build")
    assert ma == mb


def test_layout_and_metadata(digits_store):
    meta = json.loads((digits_store / "meta.json").read_text())
    assert meta["complete"] and meta["format"] == st.FORMAT and meta["version"] == st.VERSION
    assert meta["num_images"] == 126 and meta["crops"] == 3 and meta["k"] == 4
    assert meta["classes"] == [str(c) for c in range(10)] and meta["chunks"] == 4
    assert meta["teachers"] == ["digits-teacher"] and len(meta["teacher_sha256"]) == 64
    assert meta["transform"]["scale"] == [0.5, 1.0] and meta["transform"]["flip_p"] == 0.5
    files = store_files(digits_store)
    assert files["boxes"].shape == (126, 3, 5) and files["boxes"].dtype == np.int32
    assert files["ids"].shape == (126, 3, 1, 4) and files["ids"].dtype == np.uint8
    assert files["values"].dtype == np.float16
    # Top-k log-probabilities in descending order, distinct ids, some mass left for the tail.
    v = files["values"].astype(np.float64)
    assert (np.diff(v, axis=-1) <= 0).all() and (v <= 0).all()
    assert (np.exp(v).sum(-1) <= 1.001).all()
    ids = np.sort(files["ids"], axis=-1)
    assert (np.diff(ids.astype(int), axis=-1) > 0).all()
    size = sum((digits_store / f"{n}.npy").stat().st_size for n in st.FILES)
    assert size - 3 * 128 == st.store_bytes(126, 3, 1, 4, 10)  # data plus three .npy headers
    # ImageNet-1k, M = 8, k = 10: well under 1 GB.
    assert st.store_bytes(1_281_167, 8, 1, 10, 1000) == 614_960_160


def test_replay_is_exact(digits_store, cache_dir):
    """The image index and slot give bitwise the crop the build ran the teacher on, and the
    teacher on the replayed crop gives the stored ids and values."""
    cfg = resolve(run_cfg(digits_store, "unused", cache_dir))
    resolve_device(cfg)  # --amp auto is off on the CPU, as in the build (the teacher's cache key)
    src = st.source(cfg)
    opened = st.open_for_run(cfg, src, None)
    replay = st.ReplayDataset(src, opened, seed=0)
    built = st._BuildImages(src, 3, seed=0)
    files = store_files(digits_store)
    from fastkd.train import teacher as teachers

    net = teachers.build_teachers(cfg, [str(teachers.cache_entries(cfg, 1)[0].path)], 10,
                                  (1, 8, 8))[0]
    seen_slots = set()
    for epoch in range(4):
        replay.set_epoch(epoch)
        for index in (0, 57, 125):
            slot = st.slot_of(0, epoch, index, 3)
            seen_slots.add(slot)
            x, y, ids, values = replay[index]
            crops, boxes = built[index]
            assert torch.equal(x, crops[slot])
            assert np.array_equal(boxes.numpy(), files["boxes"][index])
            assert torch.equal(ids, torch.from_numpy(files["ids"][index, slot]))
            with torch.inference_mode():
                log_p = torch.log_softmax(net(x[None])[1].float(), -1)
            top, top_ids = log_p.topk(4, dim=-1)
            assert torch.equal(top_ids[0].to(torch.uint8), ids[0])
            assert torch.equal(top[0].half(), values[0])
    assert seen_slots == {0, 1, 2}
    # Every run of 3 epochs uses each of an image's 3 crops once.
    for index in range(10):
        assert sorted(st.slot_of(5, e, index, 3) for e in range(3, 6)) == [0, 1, 2]


def test_draw_is_torchvisions_get_params():
    from torchvision.transforms import RandomResizedCrop

    from fastkd.data import CropFlip

    crop = CropFlip(32)
    before = torch.get_rng_state()
    for key in (0, 1, 12345, 2**62):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key)
            expected = RandomResizedCrop.get_params(torch.zeros(3, 40, 48), [0.08, 1.0],
                                                    [3 / 4, 4 / 3])
            flip = int(torch.rand(1).item() < 0.5)
        assert crop.draw(40, 48, key) == (*expected, flip)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("method", ["kd", "topk"])
def test_train_and_resume_from_store(digits_store, tmp_path, cache_dir, method):
    full = tmp_path / "full"
    result = train(run_cfg(digits_store, full, cache_dir, method, topk=3), quiet=True)
    assert 0 <= result.val_top1 <= 100
    rows = json.loads((full / "metrics.json").read_text())
    assert len(rows) == 3 and all(np.isfinite(r["train_loss"]) for r in rows)
    part = tmp_path / "part"
    with pytest.raises(Interrupted):
        train(run_cfg(digits_store, part, cache_dir, method, topk=3, stop_after_steps=4),
              quiet=True)
    train(run_cfg(digits_store, part, cache_dir, method, topk=3, resume="auto"), quiet=True)
    assert_same_run(full, part)


def test_store_loss_is_the_sparse_teacher_kd(digits_store, cache_dir):
    """kd from a store is fastkd.kd_loss on SparseTeacher(ids, values, tail='uniform'); topk with
    --topk equal to the store's k is the same target."""
    import fastkd

    meta = json.loads((digits_store / "meta.json").read_text())
    files = store_files(digits_store)
    stored = [torch.from_numpy(files["ids"][:8, 0]), torch.from_numpy(files["values"][:8, 0])]
    s = torch.randn(8, 10, dtype=torch.float64)
    kd = resolve(run_cfg(digits_store, "o", cache_dir, "kd"))
    topk = resolve(run_cfg(digits_store, "o", cache_dir, "topk", topk=4))
    t_kd = st.teacher_fn(kd, meta, torch.device("cpu"))(stored).logits[0]
    t_topk = st.teacher_fn(topk, meta, torch.device("cpu"))(stored).logits[0]
    direct = fastkd.SparseTeacher(stored[0][:, 0].int(), stored[1][:, 0].float())
    a = fastkd.kd_loss(s, t_kd, temperature=4.0)
    assert a.item() == fastkd.kd_loss(s, direct, temperature=4.0).item()
    assert fastkd.kd_loss(s, t_topk, temperature=4.0).item() == pytest.approx(a.item(), rel=1e-6)


def test_mismatched_stores_are_refused(digits_store, tmp_path, cache_dir):
    with pytest.raises(st.StoreError, match="num_images: store 126, this run 250"):
        train(run_cfg(digits_store, tmp_path / "a", cache_dir, train_fraction=0.2), quiet=True)
    with pytest.raises(st.StoreError, match="k: the store keeps 4 classes per crop, --topk 5"):
        train(run_cfg(digits_store, tmp_path / "b", cache_dir, "topk", topk=5), quiet=True)
    with pytest.raises(st.StoreError, match="cohort: store 'teacher', this run 'dih'"):
        train(run_cfg(digits_store, tmp_path / "c", cache_dir, "dih"), quiet=True)
    other = tmp_path / "other.pt"
    from fastkd.train.models import build_model

    torch.manual_seed(3)
    torch.save(build_model("digits-teacher", 10, with_features=False,
                           input_shape=(1, 8, 8)).state_dict(), other)
    with pytest.raises(st.StoreError, match="teacher_sha256: store '[0-9a-f]{12}'"):
        train(run_cfg(digits_store, tmp_path / "d", cache_dir, teacher_weights=[str(other)]),
              quiet=True)
    for method in ("cd", "feed", "nd"):
        with pytest.raises(ConfigError, match="feature maps, which a store does not hold"):
            train(run_cfg(digits_store, tmp_path / method, cache_dir, method), quiet=True)
    # Through the command line: exit status 2 and the reason.
    code = main(["--method", "kd", "--teacher-store", str(digits_store), "--train-fraction",
                 "0.2", "--cache-dir", cache_dir, "--output", str(tmp_path / "e")])
    assert code == 2


def copy_store(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_damaged_stores_are_refused(digits_store, tmp_path, cache_dir):
    def refused(path, pattern):
        with pytest.raises(st.StoreError, match=pattern):
            train(run_cfg(path, tmp_path / "run", cache_dir, overwrite=True), quiet=True)

    truncated = copy_store(digits_store, tmp_path / "truncated")
    with open(truncated / "values.npy", "r+b") as f:
        f.truncate(1000)
    refused(truncated, "values.npy is truncated")
    flipped = copy_store(digits_store, tmp_path / "flipped")
    with open(flipped / "values.npy", "r+b") as f:
        f.seek(700)
        byte = f.read(1)
        f.seek(700)
        f.write(bytes([byte[0] ^ 0x10]))
    refused(flipped, "chunk 0 .* fails its checksum")
    incomplete = copy_store(digits_store, tmp_path / "incomplete")
    meta = json.loads((incomplete / "meta.json").read_text())
    (incomplete / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    refused(incomplete, "incomplete .*rerun the same `store build`")
    reshaped = copy_store(digits_store, tmp_path / "reshaped")
    (reshaped / "meta.json").write_text(json.dumps({**meta, "crops": 4}))
    refused(reshaped, "boxes.npy holds int32 \\(126, 3, 5\\), the metadata says int32 "
                      "\\(126, 4, 5\\)")
    (reshaped / "meta.json").unlink()
    refused(reshaped, "no meta.json; not a teacher store")


def test_interrupted_build_resumes_and_equals_an_uninterrupted_one(digits_store, tmp_path,
                                                                   cache_dir, monkeypatch):
    part = tmp_path / "part"
    write = st._Writer.write_chunk
    calls = {"n": 0}

    def crash_after_two(self, c, lo, rows):
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        calls["n"] += 1
        write(self, c, lo, rows)

    monkeypatch.setattr(st._Writer, "write_chunk", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(build_cfg(part, cache_dir), log=lambda s: None)
    monkeypatch.undo()
    assert not json.loads((part / "meta.json").read_text())["complete"]
    assert (np.load(part / "done.npy") != 0).sum() == 2
    with pytest.raises(st.StoreError, match="incomplete \\(2 of 4 chunks built\\)"):
        st.verify(part)
    lines = []
    result = build(build_cfg(part, cache_dir), log=lines.append)
    assert result.images == 126 - 64 and any("2 of 4 chunks already built" in x for x in lines)
    assert_same_store(digits_store, part)
    # A complete store is left alone; other settings are refused unless --overwrite.
    assert build(build_cfg(part, cache_dir), log=lambda s: None).images == 0
    with pytest.raises(st.StoreError, match="built with other settings \\(k: store 4, this "
                                            "run 5\\)"):
        build(build_cfg(part, cache_dir, topk=5), log=lambda s: None)


def test_kill_9_during_a_build(tmp_path, cache_dir, digits_store):
    """A build killed with SIGKILL mid-way resumes from its done chunks and equals an
    uninterrupted build."""
    args = [sys.executable, "-m", "fastkd.train", "store", "build", "--crops", "2", "--topk",
            "3", "--batch-size", "8", "--teacher-epochs", "1", "--cache-dir", cache_dir,
            "--threads", "1", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--output", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    marks = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if (killed / "meta.json").exists():
            try:
                marks = int((np.load(killed / "done.npy", mmap_mode="r") != 0).sum())
            except ValueError:
                marks = 0
            if marks >= 20:
                break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert 20 <= marks, "the build ended before it could be killed"
    done = int((np.load(killed / "done.npy") != 0).sum())
    assert done < 158, "the build ended before it could be killed"
    assert subprocess.run([*args, "--output", str(killed)], env=env,
                          capture_output=True).returncode == 0
    whole = tmp_path / "whole"
    assert subprocess.run([*args, "--output", str(whole)], env=env,
                          capture_output=True).returncode == 0
    assert_same_store(killed, whole)


def test_two_rank_gloo_build_equals_one_rank(tmp_path, cache_dir, digits_store):
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fastkd.train", "store", "build", "--output", str(two), "--crops", "3",
           "--topk", "4", "--train-fraction", "0.1", "--batch-size", "32", "--teacher-epochs",
           "1", "--cache-dir", cache_dir, "--threads", "1", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 rank(s)" in proc.stdout
    assert_same_store(digits_store, two)
    assert json.loads((two / "meta.json").read_text())["build"]["world_size"] == 2


def test_dih_store_cohort(tmp_path, cache_dir):
    """A dih store holds the heads' and the teacher's outputs (the heads trained by the build);
    dih trains from it without the teacher."""
    path = tmp_path / "dih"
    build(build_cfg(path, cache_dir, method="dih", dih_head_epochs=1), log=lambda s: None)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["teachers"] == [*(f"digits-teacher:head{i}" for i in range(1, 5)),
                                "digits-teacher"]
    assert np.load(path / "ids.npy").shape == (126, 3, 5, 4)
    assert (path / "dih-heads" / "checkpoint.pt").exists()
    out = tmp_path / "run"
    train(run_cfg(path, out, cache_dir, "dih", epochs=2), quiet=True)
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["phase"] for r in rows] == ["student", "student"]


def test_augmented_digits_do_not_depend_on_workers(tmp_path, cache_dir):
    def run(workers, name):
        return train(Config(method="scratch", augment=True, epochs=2, train_fraction=0.1,
                            batch_size=32, workers=workers, threads=1, plot=False,
                            output=str(tmp_path / name)), quiet=True)

    a, b = run(0, "a"), run(2, "b")
    assert [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]


def test_demo_store_rows(tmp_path, cache_dir, capsys):
    out = tmp_path / "demo"
    code = main(["--demo", "--demo-methods", "kd", "--demo-seeds", "0", "--epochs", "1",
                 "--max-steps-per-epoch", "1", "--teacher-epochs", "1", "--cache-dir",
                 cache_dir, "--output", str(out)])
    assert code == 0
    summary = json.loads((out / "demo.json").read_text())["summary"]
    assert [s["method"] for s in summary] == ["kd", "kd+aug", "kd@store"]
    meta = json.loads((out / "store" / "meta.json").read_text())
    assert meta["complete"] and meta["crops"] == 16 and meta["k"] == 5
    assert "teacher store (16 crops x 126 images, top 5)" in capsys.readouterr().out
