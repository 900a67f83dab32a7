"""Triton kernel of ``fastkd::scale_grads_triton_``: the backward of a one-pass loss with several
gradients (one per student tensor), in one launch.

    grads[i] *= grad_output    for every i (a scalar; nothing is written when it is exactly 1)

Each gradient is dense (any memory format), so it is scaled as its flat storage. The grid is the
concatenation of every tensor's blocks; the scalar is read on the device by every program, so
skipping costs no host sync (the launch remains, the write of the gradients does not).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .._inputs import sample_blocked
from ._common import MAXNREG, pick

MAX_TENSORS = 8
_BLOCK = 4096
# 16 elements per thread: ptxas -v (sm_90) counted up to 154 registers at 4 warps (32 elements
# per thread, Triton's default), at most 96 at 8 warps (Triton 3.6 and 3.8).
_NUM_WARPS = 8


@triton.jit
def _scale_grads_kernel(
    g0, g1, g2, g3, g4, g5, g6, g7,
    n0, n1, n2, n3, n4, n5, n6, n7,
    f0, f1, f2, f3, f4, f5, f6, f7,
    go_ptr,
    NUM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    f = tl.load(go_ptr).to(tl.float32)
    if f != 1.0:
        for k in tl.static_range(NUM):
            first = pick(k, f0, f1, f2, f3, f4, f5, f6, f7)
            n = pick(k, n0, n1, n2, n3, n4, n5, n6, n7)
            if (pid >= first) & (pid < first + tl.cdiv(n, BLOCK)):
                g_ptr = pick(k, g0, g1, g2, g3, g4, g5, g6, g7)
                offs = (pid - first).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
                mask = offs < n
                g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
                tl.store(g_ptr + offs, (g * f).to(g_ptr.dtype.element_ty), mask=mask)


@triton_op("fastkd::scale_grads_triton_", mutates_args={"grads"})
def scale_grads_triton_(grads: list[torch.Tensor], grad_output: torch.Tensor) -> None:
    if grad_output.dim() != 0:
        raise ValueError(
            f"fastkd: scale_grads_triton_ takes a scalar grad_output, got shape "
            f"{tuple(grad_output.shape)}"
        )
    live = [g for g in grads if g.numel() != 0]
    for g in live:
        if not sample_blocked(g):
            raise ValueError("fastkd: scale_grads_triton_ needs dense gradients")
    for start in range(0, len(live), MAX_TENSORS):
        chunk = live[start : start + MAX_TENSORS]
        counts = [triton.cdiv(g.numel(), _BLOCK) for g in chunk]
        firsts = [sum(counts[:i]) for i in range(len(chunk))]
        pad = MAX_TENSORS - len(chunk)
        wrap_triton(_scale_grads_kernel)[(sum(counts),)](
            *chunk, *[chunk[0]] * pad,
            *[g.numel() for g in chunk], *[0] * pad,
            *firsts, *[0] * pad,
            grad_output,
            NUM=len(chunk),
            BLOCK=_BLOCK,
            num_warps=_NUM_WARPS,
            maxnreg=MAXNREG,
        )
