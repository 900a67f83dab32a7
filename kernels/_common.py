"""Triton helpers shared by the kernels that take up to eight tensors as separate arguments."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pick(k: tl.constexpr, a0, a1, a2, a3, a4, a5, a6, a7):
    """The k-th of eight arguments, k known at compile time."""
    if k == 0:
        return a0
    elif k == 1:
        return a1
    elif k == 2:
        return a2
    elif k == 3:
        return a3
    elif k == 4:
        return a4
    elif k == 5:
        return a5
    elif k == 6:
        return a6
    else:
        return a7
