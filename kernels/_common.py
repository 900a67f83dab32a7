"""Triton helpers shared by the kernels that take up to four or eight tensors as separate
arguments."""

from __future__ import annotations

import triton
import triton.language as tl


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
