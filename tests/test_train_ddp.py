"""Two ranks on the CPU (gloo) through torchrun: DDP training, the teacher trained and cached
under DDP, metrics reduced over ranks."""

import json
import os
import subprocess
import sys

import torch

from fastkd.data import load_digits_split
from fastkd.train.models import build_model


def test_two_rank_gloo_run(tmp_path):
    out = tmp_path / "ddp"
    cache = tmp_path / "cache"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "fastkd.train", "--method", "kd", "--epochs", "2", "--train-fraction", "0.2",
        "--batch-size", "32", "--teacher-epochs", "1", "--cache-dir", str(cache),
        "--output", str(out), "--no-progress", "--no-plot",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Rank 0 alone logs.
    assert proc.stdout.count("epoch   2/2") == 1, proc.stdout
    assert "2 rank(s) on cpu" in proc.stdout
    assert len(list((cache / "teachers").glob("digits-teacher-*.pt"))) == 1

    rows = json.loads((out / "metrics.json").read_text())
    assert len(rows) == 2
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    # 251 images, 16 per rank and step: 7 steps per epoch on each rank.
    assert state["position"]["global_step"] == 14

    # Validation was split over the ranks and reduced: it equals a one-process evaluation.
    student = build_model("digits-student", 10, with_features=False, input_shape=(1, 8, 8))
    student.load_state_dict(torch.load(out / "student.pt", weights_only=True))
    student.eval()
    _, val = load_digits_split()
    with torch.no_grad():
        correct = (student(val.images)[1].argmax(-1) == val.labels).sum().item()
    assert rows[-1]["val_top1"] == 100.0 * correct / len(val.labels)
