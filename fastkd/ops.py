"""torch.library registrations: fake (meta) implementations and autograd for every fastkd op.

The C++ kernels (``fastkd._C``) and the Triton kernels (``fastkd.kernels``) register the device
implementations; this module adds what ``torch.compile``, ``opcheck`` and autograd need, in one
place.

One-pass losses (``*_fwd`` returning ``(loss, grad)``) write the student's gradient while they read
the inputs. Their backward scales that saved gradient in place by ``grad_output`` with
``scale_grad_``, which returns at once (reading the scalar on the device, no host sync) when
``grad_output`` is exactly 1 -- the common ``loss.backward()``. Because the saved gradient is
consumed in place, a second backward through the same graph (``retain_graph=True``) is refused by
autograd's saved-tensor version check instead of returning a wrongly scaled gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _C  # noqa: F401  (op schemas and C++ kernels)
from .backends import triton_status


def _kd_loss_fwd_fake(
    student, teachers, labels, kd_row_weights, ce_row_weights, kd_coefs, ce_coef, temperature,
    label_smoothing, ignore_index, per_row, compute_grad,
):
    rows = student.shape[0] * student.shape[1]
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = student.new_empty((rows,) if per_row else (), dtype=dtype)
    if compute_grad:
        grad = student.new_empty(student.shape)
    else:
        grad = student.new_empty((0,))
    return loss, grad


def _scale_grad_fake(grad, grad_output):
    return None


def _is_tensor_list(x: object) -> bool:
    return isinstance(x, list) and len(x) > 0 and isinstance(x[0], torch.Tensor)


def _one_pass_autograd(scale_grad_: Callable[[torch.Tensor, torch.Tensor], None]):
    """setup_context/backward for an op returning (loss, grad) whose first input is the student."""

    def setup_context(ctx, inputs, output):
        # autograd wants one entry per input, and a list of them for a Tensor[] input.
        ctx.no_grads = tuple(
            [None] * len(x) if _is_tensor_list(x) else None for x in inputs[1:]
        )
        ctx.has_grad = bool(inputs[-1])  # every one-pass op ends with `compute_grad`
        ctx.save_for_backward(output[1])

    def backward(ctx, grad_loss, _grad_of_grad):
        if not ctx.has_grad:
            raise RuntimeError(
                "fastkd: this loss was computed with compute_grad=False, so it has no gradient; "
                "call it through the fastkd API, which asks for one when the student requires it"
            )
        (grad,) = ctx.saved_tensors
        if grad_loss.dtype not in (torch.float32, torch.float64):
            grad_loss = grad_loss.float()
        scale_grad_(grad, grad_loss.contiguous())
        return (grad, *ctx.no_grads)

    return setup_context, backward


def _register_one_pass(fwd: str, fake: Callable, scale_grad_: Callable) -> None:
    torch.library.register_fake(fwd)(fake)
    setup_context, backward = _one_pass_autograd(scale_grad_)
    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


torch.library.register_fake("fastkd::scale_grad_")(_scale_grad_fake)
_register_one_pass("fastkd::kd_loss_fwd", _kd_loss_fwd_fake, torch.ops.fastkd.scale_grad_)

if triton_status() is None:
    torch.library.register_fake("fastkd::scale_grad_triton_")(_scale_grad_fake)
    _register_one_pass(
        "fastkd::kd_loss_fwd_triton", _kd_loss_fwd_fake, torch.ops.fastkd.scale_grad_triton_
    )
