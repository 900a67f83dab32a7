"""The CUDA KD kernels' launch plan (csrc/cuda/kd_loss_kernels.cuh: plan_launch, plan_split), read
through ``fastkd._C.kd_cuda_launch_plan``: host code, so no GPU is needed.

Checks the plan's invariants over a grid of shapes (forward KL, sparse teachers included, takes
the split kernel; reverse KL and JSD stream), and that it picks the kernels and cluster sizes
that docs/memory_traffic.md tabulates and that tests/test_kd_loss_cuda.py's split shapes are meant
to reach on an H100/H200.
"""

from __future__ import annotations

import itertools

import pytest

import fastkd

pytestmark = pytest.mark.skipif(
    not fastkd._C.with_cuda, reason="fastkd._C was built without its CUDA kernels"
)

H100 = dict(sms=132, l2_bytes=50 << 20, clusters=True)
A100 = dict(sms=108, l2_bytes=40 << 20, clusters=False)
BYTES = {"bf16": 2, "fp32": 4}
MIN_SLICE = 256 * 16  # kSplitThreads * kStreamElems classes per CTA at least


def plan(rows, cols, teachers=1, *, sparse=0, divergence=0, dtype="bf16", grad=True, gpu=H100):
    e = BYTES[dtype]
    return fastkd._C.kd_cuda_launch_plan(rows, cols, teachers, sparse, divergence, e, e, grad,
                                         gpu["sms"], gpu["l2_bytes"], gpu["clusters"])


@pytest.mark.parametrize("gpu", [H100, A100], ids=["h100", "a100"])
def test_plan_invariants(gpu):
    for rows, cols, k, sparse, div, dtype, grad in itertools.product(
        (1, 3, 64, 300, 8192), (1, 1000, 8192, 8193, 20000, 65537, 131072, 262144),
        (1, 3, 8), (0, 1), (0, 1, 2), ("bf16", "fp32"), (True, False),
    ):
        if k + sparse > 8:
            continue
        kind, tpr, blocks, threads, split = plan(rows, cols, k, sparse=sparse, divergence=div,
                                                 dtype=dtype, grad=grad, gpu=gpu)
        where = (rows, cols, k, sparse, div, dtype, grad)
        resident_cols = (16 if div == 0 else 8) * 512
        if cols <= resident_cols:
            assert kind == "resident", where
            assert tpr * (16 if div == 0 else 8) >= cols and tpr <= 512, where
            continue
        if div == 0:
            assert kind == "split" and threads == 256, where
            assert split in (1, 2, 4, 8), where
            assert blocks % split == 0 and blocks == rows * split, where
            assert split == 1 or cols // split >= MIN_SLICE, where
            if not gpu["clusters"]:
                assert split == 1, where
        else:
            assert (kind, threads, split, blocks) == ("stream", 512, 1, rows), where


@pytest.mark.parametrize(
    "rows,cols,k,dtype,split",
    [
        # docs/memory_traffic.md, headline shapes (132 SMs, 50 MiB of L2)
        (8192, 32000, 1, "bf16", 2),
        (8192, 32000, 3, "bf16", 4),
        (8192, 32000, 1, "fp32", 4),
        (8192, 32000, 3, "fp32", 4),
        (4096, 131072, 1, "bf16", 8),
        (4096, 131072, 3, "bf16", 8),
        (4096, 131072, 1, "fp32", 8),
        (4096, 131072, 3, "fp32", 8),
        # tests/test_kd_loss_cuda.py SPLIT_SHAPES, one teacher, bf16
        (300, 8200, 1, "bf16", 1),
        (300, 20000, 1, "bf16", 2),
        (300, 40000, 1, "bf16", 4),
        (300, 131072, 1, "bf16", 8),
        (3, 262144, 1, "bf16", 8),
        (5, 65537, 1, "bf16", 8),
    ],
)
def test_plan_picks_the_documented_cluster_sizes(rows, cols, k, dtype, split):
    assert plan(rows, cols, k, dtype=dtype) == ("split", 256, rows * split, 256, split)


def test_plan_without_clusters_keeps_a_block_per_row():
    assert plan(4096, 131072, gpu=A100) == ("split", 256, 4096, 256, 1)
    assert plan(1000, 4096, gpu=A100)[0] == "resident"


def test_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_teachers"):
        fastkd._C.kd_cuda_launch_plan(1, 10, 9, 0, 0, 4, 4, True, 132, 1 << 20, True)
    with pytest.raises(ValueError, match="rows, cols and sms"):
        fastkd._C.kd_cuda_launch_plan(0, 10, 1, 0, 0, 4, 4, True, 132, 1 << 20, True)
