"""pytest-benchmark suite: ``fastkd.feature_regression_loss`` against PyTorch eager and
``torch.compile``.

The cases are those of ``python -m fastkd bench --loss feature_regression``
(``fastkd/benchmark/feature_regression.py``: MSE and normalised L1 on single maps and on four
ResNet stages in one call, NCHW and channels_last), timed with
the same input rotation; each benchmark's ``extra_info`` holds the fewest bytes moved and the GB/s
of its median. The normal test run skips this file (``--benchmark-skip`` in pyproject's addopts);
run it with::

    pytest bench/bench_feature_regression.py --benchmark-only
    pytest bench/bench_feature_regression.py --benchmark-only -k "feed-cl and fwdbwd"

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
BENCH = load_loss("feature_regression")
SELECTION = Selection(device=DEVICE, peers=("eager", "compile"), quick=QUICK)
CASES = BENCH.cases(SELECTION)
IMPLS = ("fastkd", "eager", "compile")
MODES = ("fwd", "fwdbwd")
# Rounds aim at this much timed work per benchmark, within [MIN_ROUNDS, MAX_ROUNDS].
TARGET_S = 0.1 if QUICK else 1.0
MIN_ROUNDS, MAX_ROUNDS = 5, 2000


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "case", CASES, ids=[f"{'x'.join(map(str, c.shape))}-{c.dtype}-{c.variant}" for c in CASES]
)
def test_feature_regression(benchmark, case, impl, mode):
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("FASTKD_BENCH_DEVICE=cuda but no CUDA device is visible")
    chosen = {i.name: i for i in BENCH.impls(case, SELECTION)}[impl]
    if not isinstance(chosen, Impl):
        pytest.skip(chosen.reason)
    backward = mode == "fwdbwd"
    rot = Rotation(chosen.build(), input_sets(BENCH, case, DEVICE, mode), backward)

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

    nbytes = BENCH.min_bytes(case, mode)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        device=DEVICE,
        backend=chosen.backend,
        bytes=nbytes,
        gbps=nbytes / median / 1e9,
        copies=len(rot.sets),
    )
