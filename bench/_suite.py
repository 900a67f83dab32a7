"""The pytest-benchmark test shared by ``bench/bench_<loss>.py``: one benchmark per case of
``python -m fastkd bench --loss <loss>`` (``fastkd/benchmark/<loss>.py``), implementation (fastkd,
eager, compile) and mode (fwd, fwdbwd), timed with the same input rotation. Each benchmark's
``extra_info`` holds the fewest bytes moved and the GB/s of its median.

Environment: ``FASTKD_BENCH_DEVICE`` (cpu or cuda; default cuda when visible) and
``FASTKD_BENCH_QUICK=1`` (the small shapes of ``--quick``).
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from fastkd.benchmark import Impl, Rotation, Selection, input_sets, load_loss

DEVICE = os.environ.get("FASTKD_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
QUICK = os.environ.get("FASTKD_BENCH_QUICK", "0") == "1"
SELECTION = Selection(device=DEVICE, peers=("eager", "compile"), quick=QUICK)
IMPLS = ("fastkd", "eager", "compile")
MODES = ("fwd", "fwdbwd")
# Rounds aim at this much timed work per benchmark, within [MIN_ROUNDS, MAX_ROUNDS].
TARGET_S = 0.1 if QUICK else 1.0
MIN_ROUNDS, MAX_ROUNDS = 5, 2000


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


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
        backward = mode == "fwdbwd"
        rot = Rotation(chosen.build(), input_sets(bench, case, DEVICE, mode), backward)

        def call() -> None:
            rot()
            _sync()

        with torch.set_grad_enabled(backward):
            for _ in range(3):  # compiles what needs compiling
                rot.clear()
                call()
            start = time.perf_counter()
            rot.clear()
            call()
            once = max(time.perf_counter() - start, 1e-6)
            rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, TARGET_S / once)))
            benchmark.pedantic(call, setup=rot.clear, rounds=rounds, iterations=1)

        nbytes = bench.min_bytes(case, mode)
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(
            device=DEVICE,
            backend=chosen.backend,
            bytes=nbytes,
            gbps=nbytes / median / 1e9,
            copies=len(rot.sets),
        )

    return test
