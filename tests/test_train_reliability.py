"""Exact resumption, step checkpoints, SIGTERM, and the non-finite-loss stop."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastkd.train import Config, Interrupted, NonFiniteLoss, engine, methods, train

RUNTIME_COLUMNS = {"epoch_time_s", "images_per_s"}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.getbasetemp() / "fastkd-cache")


def base(method, cache_dir, **kw):
    # 126 training images in batches of 32: 3 steps per epoch.
    values = dict(method=method, epochs=3, train_fraction=0.1, batch_size=32, teacher_epochs=1,
                  cache_dir=cache_dir, dih_head_epochs=1, plot=False)
    values.update(kw)
    return values


def assert_same_run(a, b):
    rows_a = json.loads((a / "metrics.json").read_text())
    rows_b = json.loads((b / "metrics.json").read_text())
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert set(ra) == set(rb)
        for key in ra:
            if key not in RUNTIME_COLUMNS:
                assert ra[key] == rb[key], (ra["epoch"], key)
    wa = torch.load(a / "student.pt", weights_only=True)
    wb = torch.load(b / "student.pt", weights_only=True)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.parametrize("method, stop", [("kd", 4), ("dih", 3), ("dih", 5)])
def test_resume_equals_uninterrupted(method, stop, tmp_path, cache_dir):
    """Stopped mid-epoch (kd), at the heads -> student phase change and inside the second phase
    (dih): the resumed run's metrics and weights equal an uninterrupted run's exactly."""
    full = tmp_path / "full"
    train(Config(**base(method, cache_dir, output=str(full))), quiet=True)
    part = tmp_path / "part"
    with pytest.raises(Interrupted, match="--stop-after-steps"):
        train(Config(**base(method, cache_dir, output=str(part), stop_after_steps=stop)),
              quiet=True)
    state = torch.load(part / "checkpoint.pt", weights_only=True)
    assert state["position"]["global_step"] == stop and not state["finished"]
    train(Config(**base(method, cache_dir, output=str(part), resume="auto")), quiet=True)
    assert_same_run(full, part)


def test_step_checkpoint_survives_a_crash(tmp_path, cache_dir, monkeypatch):
    """--checkpoint-every writes mid-epoch checkpoints; after a crash right after one, resuming
    from it reproduces the uninterrupted run."""
    full = tmp_path / "full"
    train(Config(**base("kd", cache_dir, output=str(full))), quiet=True)
    part = tmp_path / "part"
    save = engine.save_checkpoint

    def save_then_crash(run, state, finished=False):
        save(run, state, finished)
        if (state.epoch, state.step) == (2, 2):  # global step 8
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(engine, "save_checkpoint", save_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(Config(**base("kd", cache_dir, output=str(part), checkpoint_every=2)), quiet=True)
    monkeypatch.undo()
    state = torch.load(part / "checkpoint.pt", weights_only=True)
    assert (state["position"]["epoch"], state["position"]["step"]) == (2, 2)
    train(Config(**base("kd", cache_dir, output=str(part), resume="auto")), quiet=True)
    assert_same_run(full, part)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_ce = methods._ce

    def poisoned_ce(cfg):
        ce = real_ce(cfg)

        def loss(s, y):
            calls["n"] += 1
            value = ce(s, y)
            return value * float("nan") if calls["n"] == 5 else value

        return loss

    monkeypatch.setattr(methods, "_ce", poisoned_ce)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLoss, match="NaN or infinite at epoch 2, step 2") as e:
        train(Config(method="scratch", epochs=3, train_fraction=0.1, batch_size=32,
                     output=str(out), plot=False), quiet=True)
    assert "last good checkpoint" in str(e.value)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["position"] == {"epoch": 1, "step": 0, "global_step": 3}
    for value in state["modules"]["student"].values():
        assert torch.isfinite(value.float()).all()


def _run(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "fastkd.train", *args], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, **kw,
    )


def test_sigterm_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "term"
    # 15 steps per epoch: the signal lands while five more epochs remain.
    args = ["--method", "scratch", "--epochs", "6", "--train-fraction", "0.1", "--batch-size",
            "8", "--output", str(out), "--no-progress", "--no-plot"]
    proc = _run(*args)
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        if line.startswith("epoch   1/6"):
            break
        assert time.monotonic() < deadline
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received: checkpoint saved" in err and "Traceback" not in err
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert not state["finished"] and state["position"]["global_step"] >= 15
    done = _run(*args, "--resume")
    _, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == list(range(1, 7))
    assert torch.load(out / "checkpoint.pt", weights_only=True)["finished"]


def test_interrupted_exit_status_from_main(tmp_path, capsys):
    from fastkd.train.__main__ import main

    code = main(["--method", "scratch", "--epochs", "2", "--train-fraction", "0.1",
                 "--batch-size", "32", "--output", str(tmp_path / "s"), "--stop-after-steps", "1",
                 "--no-plot"])
    assert code == 3
    assert "continue with --resume" in capsys.readouterr().err
    assert os.path.exists(tmp_path / "s" / "checkpoint.pt")
