"""Smoke tests of the benchmark harness and ``python -m fastkd bench`` (tiny shapes, short timing).

They check the structure of what the command writes, never speed.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastkd.__main__ import main
from fastkd.benchmark import Case, LossBench, Selection, _timing, available_losses, load_loss
from fastkd.benchmark._core import Inputs
from fastkd.benchmark._timing import rotation_copies

ELEMENT = {"fp32": 4, "bf16": 2}
TEACHERS = {"plain": 1, "ce": 1, "guided": 1, "cohort3": 3}
LABELS = {"plain": False, "ce": True, "guided": True, "cohort3": False}
# The CLI tests check KD's cases, so they select KD: without --loss every loss runs, and the
# KD-specific --shapes/--variants would not fit the others.
QUICK = [
    "--device", "cpu", "--quick", "--rep-ms", "2", "--warmup-ms", "1", "--threads", "1",
    "--loss", "kd_loss",
]


def expected_bytes(shape, dtype, variant, mode):
    """The fewest bytes KD moves, written out independently of the harness."""
    rows, classes = shape
    tensor = rows * classes * ELEMENT[dtype]
    labels = 8 * rows if LABELS[variant] else 0
    return {
        "fwd": tensor * (1 + TEACHERS[variant]) + labels,
        "fwdbwd": tensor * (2 + TEACHERS[variant]) + labels,
        "bwd": tensor,
    }[mode]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_cli(*argv):
    return main(["bench", *QUICK, *argv])


def test_quick_run_writes_json_table_and_plot(tmp_path, capsys, restore_threads):
    out, png = tmp_path / "kd.json", tmp_path / "kd.png"
    variants = ["plain", "ce", "guided", "cohort3"]
    rc = run_cli(
        "--shapes",
        "8x16",
        "--dtype",
        "fp32",
        "bf16",
        "--variants",
        *variants,
        "--mode",
        "fwd",
        "fwdbwd",
        "bwd",
        "--peers",
        "eager",
        "liger",
        "--backend",
        "torch",
        "--json",
        str(out),
        "--plot",
        str(png),
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "copy bandwidth" in printed and "8x16" in printed and "fastkd[cpu]" in printed

    data = json.loads(out.read_text())
    assert data["schema"] == "fastkd-bench/1"
    env = data["environment"]
    for key in (
        "device",
        "device_name",
        "cpu_model",
        "gpu_name",
        "torch",
        "triton",
        "python",
        "git_commit",
        "cache_bytes",
        "cpu_threads",
    ):
        assert key in env
    assert env["device"] == "cpu" and env["gpu_name"] is None and env["cpu_threads"] == 1
    assert env["torch"] == torch.__version__
    (run,) = data["runs"]
    assert run["command"].startswith("python -m fastkd bench")
    assert run["copy_bandwidth"]["bytes"] == 2 * (64 << 20)
    assert run["copy_bandwidth"]["gbps"] > 0
    assert data["copy_bandwidth_gbps"] == run["copy_bandwidth"]["gbps"]

    ms = data["measurements"]
    impls = {"fastkd", "fastkd-torch", "eager"}
    assert len(ms) == 2 * len(variants) * 3 * len(impls)
    seen = {(m["dtype"], m["variant"], m["mode"], m["impl"]) for m in ms}
    assert len(seen) == len(ms)
    for m in ms:
        assert m["impl"] in impls and m["loss"] == "kd_loss" and m["shape"] == [8, 16]
        assert m["case"] == f"kd_loss/8x16/{m['dtype']}/{m['variant']}"
        assert m["bytes"] == expected_bytes(m["shape"], m["dtype"], m["variant"], m["mode"])
        assert m["peak_mem_bytes"] is None  # CPU: not measured
        if m["mode"] == "bwd":
            assert m["derived"] is True
            continue
        assert m["derived"] is False
        assert m["median_ms"] > 0 and m["p20_ms"] <= m["median_ms"] <= m["p80_ms"]
        assert m["reps"] >= 5 and m["copies"] >= 1
        assert m["gbps"] == pytest.approx(m["bytes"] / (m["median_ms"] * 1e-3) / 1e9)
        assert m["copy_fraction"] == pytest.approx(m["gbps"] / data["copy_bandwidth_gbps"])
        assert math.isfinite(m["value"])
        assert m["rel_err"] < (1e-4 if m["impl"] != "eager" or m["dtype"] == "fp32" else 5e-2)
        eager = next(
            e for e in ms if (e["case"], e["mode"], e["impl"]) == (m["case"], m["mode"], "eager")
        )
        assert m["speedup_vs_eager"] == pytest.approx(eager["median_ms"] / m["median_ms"])
        assert m["speedup_vs_compile"] is None
    assert {m["backend"] for m in ms if m["impl"] == "fastkd"} == {"cpu"}
    assert {m["backend"] for m in ms if m["impl"] == "fastkd-torch"} == {"torch"}

    skipped = data["skipped"]
    assert skipped and all(s["impl"] == "liger" for s in skipped)
    assert "CUDA only" in skipped[0]["reason"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_append_merges_runs_and_report_reprints(tmp_path, capsys, restore_threads):
    out = tmp_path / "kd.json"
    common = ["--shapes", "4x8", "--dtype", "fp32", "--mode", "fwd", "--json", str(out)]
    assert run_cli(*common, "--variants", "plain", "--peers", "eager") == 0
    assert run_cli(*common, "--variants", "plain", "ce", "--peers", "--append") == 0
    data = json.loads(out.read_text())
    assert len(data["runs"]) == 2
    keys = [(m["variant"], m["impl"], m["run"]) for m in data["measurements"]]
    # plain/fastkd was measured again by the second run and replaced; eager came from the first.
    assert sorted(keys) == [("ce", "fastkd", 1), ("plain", "eager", 0), ("plain", "fastkd", 1)]
    capsys.readouterr()

    png = tmp_path / "again.png"
    assert main(["report", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("4x8") == 3 and png.exists()

    # The Markdown summary: one row per fastkd measurement of the modes asked for, eager's time
    # beside it where measured, "-" for a peer that was not.
    assert main(["report", "--markdown", "--mode", "fwd", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| loss | shape |") and len(lines) == 2 + 2
    cells = {line.split(" | ")[3]: line.split(" | ") for line in lines[2:]}
    assert cells["plain"][6] != "-" and cells["ce"][6] == "-" and cells["ce"][7] == "-"
    assert main(["report", str(out), "--markdown"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2  # no fwdbwd was measured


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shapes", "1000"], "at least two dims"),
        (["--shapes", "0x10"], "positive sizes"),
        (["--loss", "nope"], "no benchmark cases for loss 'nope'"),
        (["--variants", "nope"], "unknown variant"),
        (["--append"], "--append needs --json"),
        (["--rep-ms", "0"], "positive number"),
        (["--peers", "tvm"], "invalid choice"),
    ],
)
def test_bad_arguments_are_reported(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--device", "cpu", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_gpu_is_reported(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


def test_module_entry_point_and_list(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "fastkd", "bench", "--list"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "kd_loss" in run.stdout and "cohort3" in run.stdout


def test_pytest_benchmark_suite_reports_the_harness_samples(tmp_path):
    """bench/bench_kd_loss.py: pytest-benchmark's statistics are those of the harness's per-call
    samples (GB/s of their median), not a timing of its own."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "suite.json"
    # The pytest script, not `python -m pytest`, which would put the root on sys.path.
    pytest_script = Path(sys.executable).with_name("pytest")
    run = subprocess.run(
        [str(pytest_script), "bench/bench_kd_loss.py", "--benchmark-only", "-q",
         "-p", "no:cacheprovider", "-k", "64x100-fp32-plain-fastkd-fwd and not fwdbwd",
         f"--benchmark-json={out}"],
        cwd=root,
        env={**os.environ, "FASTKD_BENCH_QUICK": "1", "FASTKD_BENCH_DEVICE": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (result,) = json.loads(out.read_text())["benchmarks"]
    info, stats = result["extra_info"], result["stats"]
    assert info["device"] == "cpu" and info["backend"] == "cpu" and info["copies"] >= 1
    assert info["bytes"] == expected_bytes((64, 100), "fp32", "plain", "fwd")
    assert stats["rounds"] >= _timing.MIN_REPS and stats["iterations"] == 1
    assert math.isclose(info["gbps"], info["bytes"] / stats["median"] / 1e9, rel_tol=1e-9)
    assert info["copy_fraction"] > 0


def test_no_command_prints_the_commands(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "bench" in err and "report" in err


def test_registry_finds_kd_loss():
    assert "kd_loss" in available_losses()
    bench = load_loss("kd_loss")
    assert isinstance(bench, LossBench) and bench.name == "kd_loss"
    case = Case("kd_loss", (4096, 1000), "bf16", "cohort3")
    impls = bench.impls(case, Selection(device="cpu", backends=("cpu", "torch"), peers=("eager",)))
    assert [i.name for i in impls] == ["fastkd", "fastkd-cpu", "fastkd-torch", "eager"]
    assert [type(i).__name__ for i in impls] == ["Impl", "Skip", "Impl", "Impl"]
    assert impls[0].backend == "cpu" and "auto chose cpu" in impls[1].reason
    assert bench.min_bytes(case, "fwdbwd") == expected_bytes(
        (4096, 1000), "bf16", "cohort3", "fwdbwd"
    )


@pytest.mark.parametrize("set_bytes", [1, 1000, 3 << 20, 64 << 20, 65 << 20, 1 << 30])
def test_rotation_exceeds_twice_the_cache(set_bytes):
    cache = 32 << 20
    copies = rotation_copies(set_bytes, cache)
    assert copies >= 1
    if copies < 4096:
        assert copies * set_bytes > 2 * cache
        assert copies == 1 or (copies - 1) * set_bytes <= 2 * cache


@pytest.mark.parametrize("cache", ["steady", "cold"])
def test_interleaved_timer_cache_states(cache, monkeypatch):
    """`steady` precedes every timed call with an untimed call of the same implementation on
    another input copy; `cold` does not. Either way each timed call follows a scrub."""
    scrubs, log = [], []
    monkeypatch.setattr(_timing.CacheScrub, "__init__", lambda self: None)
    monkeypatch.setattr(_timing.CacheScrub, "__call__", lambda self: scrubs.append(len(log)))

    def rotation(name):
        sets = [Inputs((i,), ()) for i in range(3)]
        return _timing.Rotation(lambda i: log.append((name, i)), sets, backward=False)

    rots = [rotation("a"), rotation("b")]
    timings = _timing.time_cpu_interleaved(rots, budget_ms=0.0, warmup_ms=0.0, cache=cache)
    assert [t.reps for t in timings] == [_timing.MIN_REPS] * 2
    timed = log[6:]  # after 3 warm-up rounds of one call each
    assert len(scrubs) == 2 * _timing.MIN_REPS
    per_timed = 2 if cache == "steady" else 1
    assert len(timed) == per_timed * len(scrubs)
    for k, at in enumerate(scrubs):
        calls = log[at : at + per_timed]
        assert calls[0][0] == ("a", "b")[k % 2] and len({n for n, _ in calls}) == 1
        if cache == "steady":
            assert calls[0][1] != calls[1][1]  # the timed call's inputs were not just read
    with pytest.raises(ValueError, match="cache must be one of"):
        _timing.time_cpu_interleaved(rots, 0.0, 0.0, cache="warm")


def test_spent_budget_skips_the_rest(tmp_path, capsys, restore_threads):
    out = tmp_path / "kd.json"
    rc = run_cli(
        "--loss",
        "kd_loss",
        "--shapes",
        "4x8",
        "--dtype",
        "fp32",
        "--peers",
        "eager",
        "--budget",
        "1e-6",
        "--json",
        str(out),
    )
    assert rc == 1  # nothing was measured
    data = json.loads(out.read_text())
    assert data["measurements"] == []
    skipped = data["skipped"]
    assert len(skipped) == 2 * 2 * 2  # variants plain and ce x modes x (fastkd, eager)
    assert {(s["impl"], s["mode"]) for s in skipped} == {
        (impl, mode) for impl in ("fastkd", "eager") for mode in ("fwd", "fwdbwd")
    }
    assert all("time budget" in s["reason"] for s in skipped)


def test_tune_writes_the_table_auto_reads(tmp_path):
    """`python -m fastkd tune`: per dtype and size the fastest GPU backend, merged into rules that
    fastkd.backends.measured_order resolves."""
    from fastkd.backends import measured_order
    from fastkd.benchmark._tune import tune

    def m(backend, shape, ms, impl="fastkd"):
        return {"loss": "kd_loss", "mode": "fwdbwd", "impl": impl, "backend": backend,
                "dtype": "bf16", "shape": shape, "median_ms": ms}

    gpu = "Some GPU"
    results = {
        "created": "today",
        "environment": {"gpu_name": gpu, "git_commit": "c0ffee"},
        "measurements": [
            m("cuda", [8192, 100], 0.05), m("triton", [8192, 100], 0.04),
            m("cuda", [8192, 1000], 0.10), m("triton", [8192, 1000], 0.09),
            m("cuda", [8192, 32000], 1.0), m("triton", [8192, 32000], 1.2),
            m(None, [8192, 32000], 0.1, impl="eager"),
        ],
    }
    (path,) = tune(results, tmp_path)
    table = json.loads(path.read_text())
    assert [r["max_size"] for r in table["devices"][0]["rules"]] == [1000, None]
    assert measured_order(table, gpu, "bfloat16", 100) == ("triton", "cuda")
    assert measured_order(table, gpu, "bfloat16", 1001) == ("cuda", "triton")
    assert measured_order(table, gpu, "float32", 100) == ()
    assert measured_order(table, "Another GPU", "bfloat16", 100) == ()
    # A second run for the same GPU replaces its entry, other GPUs stay.
    tune({**results, "environment": {"gpu_name": "Another GPU"}}, tmp_path)
    tune(results, tmp_path)
    assert sorted(d["device"] for d in json.loads(path.read_text())["devices"]) == [
        "Another GPU", gpu
    ]
    with pytest.raises(ValueError, match="not measured on a GPU"):
        tune({"environment": {}, "measurements": []}, tmp_path)
