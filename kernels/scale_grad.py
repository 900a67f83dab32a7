"""Triton kernel of ``fastkd::scale_grad_triton_``: the backward of every one-pass loss.

    grad *= grad_output             (a scalar; nothing is written when it is exactly 1)
    grad[b, :] *= grad_output[b]    (one value per row, last dim = row)

The scalar is read on the device by every program, so skipping costs no host sync; the launch
itself remains (a few microseconds), the write of the whole gradient does not.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import MAXNREG

_BLOCK = 4096
# 16 elements per thread: ptxas -v (sm_90) counted up to 154 registers at 4 warps (32 elements
# per thread, Triton's default), at most 96 at 8 warps (Triton 3.6 and 3.8).
_NUM_WARPS = 8


@triton.jit
def _scale_grad_kernel(g_ptr, go_ptr, n, row_len, PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if PER_ROW:
        f = tl.load(go_ptr + offs // row_len, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
        tl.store(g_ptr + offs, (g * f).to(g_ptr.dtype.element_ty), mask=mask)
    else:
        f = tl.load(go_ptr).to(tl.float32)
        if f != 1.0:
            g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
            tl.store(g_ptr + offs, (g * f).to(g_ptr.dtype.element_ty), mask=mask)


@triton_op("fastkd::scale_grad_triton_", mutates_args={"grad"})
def scale_grad_triton_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    if not grad.is_contiguous():
        raise ValueError("fastkd: scale_grad_triton_ needs a contiguous gradient")
    n = grad.numel()
    if n == 0:
        return
    per_row = grad_output.dim() != 0
    row_len = grad.shape[-1] if grad.dim() > 0 else 1
    if per_row and grad_output.numel() * row_len != n:
        raise ValueError(
            f"fastkd: grad_output must be a scalar or hold one value per row "
            f"({n // row_len}), got shape {tuple(grad_output.shape)}"
        )
    wrap_triton(_scale_grad_kernel)[(triton.cdiv(n, _BLOCK),)](
        grad, grad_output, n, row_len, PER_ROW=per_row, BLOCK=_BLOCK, num_warps=_NUM_WARPS,
        maxnreg=MAXNREG,
    )
