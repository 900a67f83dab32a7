"""torch.library registrations: fake (meta) implementations and autograd for every fastkd op.

The C++ kernels (``fastkd._C``) and the Triton kernels (``fastkd.kernels``) register the device
implementations; this module adds what ``torch.compile``, ``opcheck`` and autograd need, in one
place.

One-pass losses (``*_fwd`` returning ``(loss, grad)``) write the student's gradient while they read
the inputs. Their backward scales that saved gradient in place by ``grad_output`` with
``scale_grad_``, which returns at once (reading the scalar on the device, no host sync) when
``grad_output`` is exactly 1 -- the common ``loss.backward()``. Because the saved gradient is
consumed in place, a second backward through the same graph (``retain_graph=True``) is refused by
autograd's saved-tensor version check instead of returning a wrongly scaled gradient. When the
backward is traced (``torch.compile``, AOT autograd) it is the plain product ``grad * grad_output``
instead, which the compiler fuses into the gradient's consumer: AOT autograd cannot partition an
in-place update of a tensor the forward returned (and ``opcheck`` returns every output).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._subclasses.functional_tensor import FunctionalTensor

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


def _feature_regression_fwd_fake(students, teachers, weights, p, normalize, mean, compute_grad):
    dtype = torch.float64 if students[0].dtype == torch.float64 else torch.float32
    loss = students[0].new_empty((), dtype=dtype)
    # empty_like keeps a dense student's strides, as the kernels' allocation does.
    grads = [
        torch.empty_like(s) if g else s.new_empty((0,))
        for s, g in zip(students, compute_grad, strict=True)
    ]
    return loss, grads


def _scale_grad_fake(grad, grad_output):
    return None


def _is_tensor_list(x: object) -> bool:
    return isinstance(x, list) and len(x) > 0 and isinstance(x[0], torch.Tensor)


def _one_pass_autograd(scale_grad_: Callable[..., None]):
    """setup_context/backward for an op returning (loss, grad) whose first input is the student.

    Ops over a list of students return a list of gradients and end with a list of compute_grad
    flags (one per student); their backward scales every computed gradient with one grouped call
    of `scale_grad_`, which then takes the list.
    """

    def setup_context(ctx, inputs, output):
        # autograd wants one entry per input, and a list of them for a Tensor[] input.
        ctx.no_grads = tuple(
            [None] * len(x) if _is_tensor_list(x) else None for x in inputs[1:]
        )
        # The gradient outputs are results, not functions of the inputs to differentiate; without
        # this autograd would also hand the backward a zero-filled tensor of every gradient's
        # size (materialised for the unused outputs), as costly as the loss itself.
        grads = output[1] if isinstance(output[1], (list, tuple)) else [output[1]]
        ctx.mark_non_differentiable(*grads)
        ctx.set_materialize_grads(False)
        flags = inputs[-1]  # every one-pass op ends with `compute_grad`
        if isinstance(flags, (list, tuple)):
            ctx.grad_flags = [bool(f) for f in flags]
            ctx.has_grad = any(ctx.grad_flags)
            ctx.save_for_backward(*[g for g, f in zip(output[1], ctx.grad_flags, strict=True) if f])
        else:
            ctx.grad_flags = None
            ctx.has_grad = bool(flags)
            ctx.save_for_backward(output[1])

    def backward(ctx, grad_loss, *_grads_of_grads):
        if grad_loss is None:  # only a gradient output was used: nothing flows to the student
            return (None if ctx.grad_flags is None else [None] * len(ctx.grad_flags), *ctx.no_grads)
        if not ctx.has_grad:
            raise RuntimeError(
                "fastkd: this loss was computed with compute_grad=False, so it has no gradient; "
                "call it through the fastkd API, which asks for one when the student requires it"
            )
        saved = ctx.saved_tensors
        if grad_loss.dtype not in (torch.float32, torch.float64):
            grad_loss = grad_loss.float()
        grad_loss = grad_loss.contiguous()
        if torch.compiler.is_compiling() or isinstance(saved[0], FunctionalTensor):
            # Traced (torch.compile, AOT autograd): the plain product, which the compiler fuses
            # into whatever consumes the gradient. An in-place update of a tensor the forward
            # returned cannot be partitioned by AOT autograd.
            scaled = [_scaled(g, grad_loss) for g in saved]
            if ctx.grad_flags is None:
                return (scaled[0], *ctx.no_grads)
            it = iter(scaled)
            return ([next(it) if f else None for f in ctx.grad_flags], *ctx.no_grads)
        if ctx.grad_flags is None:
            scale_grad_(saved[0], grad_loss)
            return (saved[0], *ctx.no_grads)
        scale_grad_(list(saved), grad_loss)
        it = iter(saved)
        return ([next(it) if f else None for f in ctx.grad_flags], *ctx.no_grads)

    return setup_context, backward


def _scaled(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """grad * grad_output out of place: a scalar, or one value per row (last dim = row)."""
    if grad_output.dim() != 0:
        grad_output = grad_output.reshape(*grad.shape[:-1], 1)
    return (grad * grad_output).to(grad.dtype)


def _register_one_pass(fwd: str, fake: Callable, scale_grad_: Callable) -> None:
    torch.library.register_fake(fwd)(fake)
    setup_context, backward = _one_pass_autograd(scale_grad_)
    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


torch.library.register_fake("fastkd::scale_grad_")(_scale_grad_fake)
torch.library.register_fake("fastkd::scale_grads_")(_scale_grad_fake)
_register_one_pass("fastkd::kd_loss_fwd", _kd_loss_fwd_fake, torch.ops.fastkd.scale_grad_)
_register_one_pass(
    "fastkd::feature_regression_fwd", _feature_regression_fwd_fake, torch.ops.fastkd.scale_grads_
)

if triton_status() is None:
    torch.library.register_fake("fastkd::scale_grad_triton_")(_scale_grad_fake)
    _register_one_pass(
        "fastkd::kd_loss_fwd_triton", _kd_loss_fwd_fake, torch.ops.fastkd.scale_grad_triton_
    )
    torch.library.register_fake("fastkd::scale_grads_triton_")(_scale_grad_fake)
    _register_one_pass(
        "fastkd::feature_regression_fwd_triton",
        _feature_regression_fwd_fake,
        torch.ops.fastkd.scale_grads_triton_,
    )
