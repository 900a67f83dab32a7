"""Triton helpers shared by the kernels that take up to four or eight tensors as separate
arguments, and the register budget every launcher passes."""

from __future__ import annotations

import triton
import triton.language as tl

# Registers per thread that ptxas may use, passed as ``maxnreg`` by every launcher. Without a
# budget ptxas trades a few spilled bytes for occupancy, differently per version and target
# (tests/gpu_compile.py, ptxas -v: 4-88 bytes spilled at exactly 40 or 64 registers in KD
# kernels of 16 warps and normalized feature-regression kernels of 8 warps, Triton 3.6 and 3.8,
# sm_80 and sm_90). With the budget no kernel spills and none needs more than 128.
MAXNREG = 128


@triton.jit
def pick4(k: tl.constexpr, a0, a1, a2, a3):
    """The k-th of four arguments, k known at compile time."""
    if k == 0:
        return a0
    elif k == 1:
        return a1
    elif k == 2:
        return a2
    else:
        return a3


@triton.jit
def pick(k: tl.constexpr, a0, a1, a2, a3, a4, a5, a6, a7):
    """The k-th of eight arguments, k known at compile time."""
    if k < 4:
        return pick4(k, a0, a1, a2, a3)
    else:
        return pick4(k - 4, a4, a5, a6, a7)
