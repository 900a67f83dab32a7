"""Fake (meta) implementations of every fastkd op, and the autograd of the one-pass losses.

The C++ kernels (``fastkd._C``) and the Triton kernels (``fastkd.kernels``) register the device
implementations; this module adds what ``torch.compile`` and ``opcheck`` need, in one place.

One-pass losses (``*_fwd`` ops returning ``(loss, grad)``) write the student's gradient while they
read the inputs. The ops themselves are not differentiable: ``OnePassLoss`` (an
``autograd.Function``) runs one with the gradient requested and keeps it; its backward scales that
saved gradient in place by ``grad_output`` with ``scale_grad_``, which returns at once (reading the
scalar on the device, no host sync) when ``grad_output`` is exactly 1 -- the common
``loss.backward()``. Because the saved gradient is consumed in place, a second backward through the
same graph (``retain_graph=True``) is refused by autograd's saved-tensor version check instead of
returning a wrongly scaled gradient.

Why not ``torch.library.register_autograd`` on the ops: with the gradient as an op output that the
backward mutates, AOTAutograd's partitioner rejects the traced graph (``opcheck``'s
``test_aot_dispatch_*``), and the wrapper's argument handling cost more host time per call than the
kernel itself on a 64 x 100 batch. Pure ops under an ``autograd.Function`` pass every ``opcheck``
test, trace under ``torch.compile(fullgraph=True)`` and add only autograd's own per-call cost.
"""

from __future__ import annotations

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


class OnePassLoss(torch.autograd.Function):
    """Differentiates ``fwd(student, *args, compute_grad) -> (loss, grad)`` w.r.t. the student.

    Call as ``OnePassLoss.apply(student, fwd, scale_grad_, *args)``; only the student receives a
    gradient.
    """

    @staticmethod
    def forward(ctx, student, fwd, scale_grad_, *args):
        loss, grad = fwd(student, *args, True)
        ctx.scale_grad_ = scale_grad_
        ctx.num_args = len(args)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        if grad_loss.dtype not in (torch.float32, torch.float64):
            grad_loss = grad_loss.float()
        ctx.scale_grad_(grad, grad_loss.contiguous())
        return (grad, None, None) + (None,) * ctx.num_args


torch.library.register_fake("fastkd::kd_loss_fwd")(_kd_loss_fwd_fake)
torch.library.register_fake("fastkd::scale_grad_")(_scale_grad_fake)

if triton_status() is None:
    torch.library.register_fake("fastkd::kd_loss_fwd_triton")(_kd_loss_fwd_fake)
    torch.library.register_fake("fastkd::scale_grad_triton_")(_scale_grad_fake)
