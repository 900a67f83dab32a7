"""The pytest-benchmark test shared by ``bench/bench_<loss>.py``: one benchmark per case of
``python -m fastkd bench --loss <loss>`` (``fastkd/benchmark/<loss>.py``), implementation (fastkd,
eager, compile) and mode (fwd, fwdbwd).

Each benchmark is measured by ``python -m fastkd bench``'s own code (``Runner.measure``: the same
input rotation, timer, warm-up and time budget), one implementation at a time, and pytest-benchmark
receives that measurement's per-call times instead of timing anything itself: its min, median,
mean and spread are those of the samples behind the bench command's figures. Each benchmark's
``extra_info`` holds the device, the backend, the fewest bytes moved, the GB/s of the median, its
fraction of the copy bandwidth (measured once per session) and the number of rotated input copies.

Environment: ``FASTKD_BENCH_DEVICE`` (cpu or cuda; default cuda when visible) and
``FASTKD_BENCH_QUICK=1`` (the small shapes and short timing of ``--quick``).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from fastkd.benchmark import Impl, Runner, Selection, Settings, load_loss

DEVICE = os.environ.get("FASTKD_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("FASTKD_BENCH_QUICK", "0") == "1"
SELECTION = Selection(device=DEVICE, peers=("eager", "compile"), quick=QUICK)
IMPLS = ("fastkd", "eager", "compile")
MODES = ("fwd", "fwdbwd")


@functools.cache
def _runner() -> Runner:
    runner = Runner(SELECTION, Settings.defaults(DEVICE, QUICK))
    runner.log = lambda msg: None  # pytest reports what failed
    return runner


def _hand_over(benchmark, samples_ms: list[float]) -> None:
    """Gives pytest-benchmark the per-call times: what ``benchmark.pedantic`` does with the
    duration of each round it times, which pytest-benchmark (5.x) offers no public call for."""
    benchmark._mode = "fastkd.benchmark"
    stats = benchmark._make_stats(1)
    for ms in samples_ms:
        stats.update(ms / 1e3)


def loss_benchmark(loss: str):
    """The parametrized test function of `loss`, to be bound to a ``test_*`` name."""
    bench = load_loss(loss)
    cases = bench.cases(SELECTION)

    @pytest.mark.parametrize("mode", MODES)
    @pytest.mark.parametrize("impl", IMPLS)
    @pytest.mark.parametrize(
        "case", cases, ids=[f"{'x'.join(map(str, c.shape))}-{c.dtype}-{c.variant}" for c in cases]
    )
    def test(benchmark, case, impl, mode):
        if DEVICE == "cuda" and not torch.cuda.is_available():
            pytest.skip("FASTKD_BENCH_DEVICE=cuda but no CUDA device is visible")
        chosen = {i.name: i for i in bench.impls(case, SELECTION)}[impl]
        if not isinstance(chosen, Impl):
            pytest.skip(chosen.reason)
        runner = _runner()
        sets = runner.input_sets(bench, case, mode)
        if benchmark.disabled:  # --benchmark-disable: one call, as pytest-benchmark does
            with torch.set_grad_enabled(mode == "fwdbwd"):
                loss_value = chosen.build()(*sets[0].args)
                if mode == "fwdbwd":
                    loss_value.backward()
            return
        measured = runner.measure(bench, case, mode, [chosen], sets)
        if not measured:
            pytest.fail(f"{impl} did not run: {runner.skipped[-1]['reason']}")
        m, timing = measured[0]
        _hand_over(benchmark, timing.samples_ms)
        benchmark.extra_info.update(
            device=DEVICE,
            backend=m["backend"],
            bytes=m["bytes"],
            gbps=m["gbps"],
            copy_fraction=m["copy_fraction"],
            copies=m["copies"],
        )

    return test
