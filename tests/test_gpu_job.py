"""scripts/gpu_job.sh, the one-command GPU job, checked on the CPU so that it cannot rot.

The dry run (GPU_JOB_DRY_RUN=1) goes through every phase of the headline plan -- the GPU test
selections (which skip here), every benchmark command with tiny shapes, the report -- without the
build. The job's time plan is checked against the 8 minutes one command may take on a GPU machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_job.sh"
ONE_COMMAND_S = 480
MAX_FILES = 8


def test_the_budget_fits_one_command():
    text = SCRIPT.read_text()
    budget = int(re.search(r"TOTAL=\$\{GPU_JOB_BUDGET_S:-(\d+)\}", text).group(1))
    assert budget <= ONE_COMMAND_S - 10, budget  # margin for the final report and tear-down


def _dry_run(tmp_path, plan: str, phases: tuple[str, ...]) -> tuple[Path, dict]:
    """Runs the job's plan as a dry run; checks every phase ended ok and the output folder's size;
    returns the folder and the benchmark JSON."""
    out = tmp_path / "out"
    env = {**os.environ, "GPU_JOB_DRY_RUN": "1", "GPU_JOB_PLAN": plan, "OUT": str(out),
           "PYTHON": sys.executable}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    run = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                         timeout=600)
    summary = (out / "summary.txt").read_text()
    assert run.returncode == 0, summary + run.stdout[-3000:] + run.stderr[-3000:]
    ended = dict(line.split(None, 1) for line in summary.splitlines())
    for name in ("env", "import", *phases, "report"):
        assert ended.get(name, "").startswith("ok"), (name, summary)
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES, files
    assert {"summary.txt", "gpu_job.log", "tests.log", "bench.json", "bench.txt",
            "bench.png"} <= set(files), files
    return out, json.loads((out / "bench.json").read_text())


def test_dry_run_completes_every_phase(tmp_path):
    _, results = _dry_run(tmp_path, "headline", (
        "tests-kd", "tests-features", "bench-kd", "bench-kd-compile", "bench-kd-variants",
        "bench-features"))
    losses = {m["loss"] for m in results["measurements"]}
    assert {"kd_loss", "channel_attention", "feature_regression"} <= losses, losses


def test_lm_plan_dry_run_completes_every_phase(tmp_path):
    """GPU_JOB_PLAN=lm: the divergences, the fused LM head and the teacher-store step bench."""
    out, results = _dry_run(tmp_path, "lm", (
        "tests-div", "tests-head", "bench-div", "bench-div-compile", "bench-head",
        "bench-store"))
    assert (out / "store.tar").is_file()
    assert {(m["loss"], m["variant"]) for m in results["measurements"]} >= {
        ("kd_loss", "reverse"), ("kd_loss", "jsd")}
