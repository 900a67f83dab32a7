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

Channel attention is not one-pass: its gradient is one value per (b, c) broadcast over H x W, so
the forward keeps only those values (``diff``, a few KiB) and the backward writes the broadcast
gradient, once, when autograd asks for it -- storing a full-size gradient from the forward would
double the bytes moved. Its backward can therefore run more than once (``retain_graph=True``).
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


def grad_channels_last(x: torch.Tensor) -> bool:
    """Whether the gradient of a 4-D map is written channels_last: the map's own memory format
    (channels innermost), contiguous NCHW otherwise. Ambiguous maps (C = 1 or H * W = 1, where
    both formats coincide) get contiguous NCHW."""
    b, c, h, w = x.shape
    if c == 1 or h * w == 1 or x.is_contiguous():
        return False
    return x.is_contiguous(memory_format=torch.channels_last) or x.stride(1) == 1


def _channel_attention_fwd_fake(students, teachers, weights, mean):
    dtype = torch.float64 if students[0].dtype == torch.float64 else torch.float32
    n = sum(s.shape[0] * s.shape[1] for s in students)
    return students[0].new_empty((), dtype=dtype), students[0].new_empty((n,), dtype=dtype)


def _channel_attention_bwd_fake(diffs, grad_output, sizes, channels_last, dtype):
    grads = []
    for i, d in enumerate(diffs):
        b, c, h, w = sizes[4 * i : 4 * i + 4]
        cl = channels_last[i] and c > 1 and h * w > 1
        grads.append(
            torch.empty(
                (b, c, h, w),
                dtype=dtype,
                device=d.device,
                memory_format=torch.channels_last if cl else torch.contiguous_format,
            )
        )
    return grads


def _register_channel_attention(fwd: str, bwd: str) -> None:
    """Fake and autograd implementations of a channel-attention op pair.

    The forward's second output, ``diff``, is every pair's ``[B, C]`` block of per-channel
    gradient values (concatenated); the backward broadcasts ``grad_output * diff`` into each
    student's shape, dtype and memory format -- only for the students that require grad.
    """
    torch.library.register_fake(fwd)(_channel_attention_fwd_fake)
    torch.library.register_fake(bwd)(_channel_attention_bwd_fake)
    bwd_op = getattr(torch.ops.fastkd, bwd.split("::")[1])

    def setup_context(ctx, inputs, output):
        students, teachers = inputs[0], inputs[1]
        ctx.sizes = [tuple(s.shape) for s in students]
        ctx.channels_last = [grad_channels_last(s) for s in students]
        ctx.dtypes = [s.dtype for s in students]
        ctx.num_teachers = len(teachers)
        ctx.save_for_backward(output[1])

    def backward(ctx, grad_loss, _grad_diff):
        (diff,) = ctx.saved_tensors
        grads = [None] * len(ctx.sizes)
        blocks = diff.split([size[0] * size[1] for size in ctx.sizes])
        if grad_loss.dtype not in (torch.float32, torch.float64):
            grad_loss = grad_loss.float()
        # One call per student dtype (in practice one call): the students that require grad.
        for dtype in dict.fromkeys(ctx.dtypes):
            wanted = [
                i
                for i, needed in enumerate(ctx.needs_input_grad[0])
                if needed and ctx.dtypes[i] == dtype
            ]
            if not wanted:
                continue
            computed = bwd_op(
                [blocks[i].view(ctx.sizes[i][0], ctx.sizes[i][1]) for i in wanted],
                grad_loss,
                [n for i in wanted for n in ctx.sizes[i]],
                [ctx.channels_last[i] for i in wanted],
                dtype,
            )
            for i, g in zip(wanted, computed, strict=True):
                grads[i] = g
        return grads, [None] * ctx.num_teachers, None, None

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


torch.library.register_fake("fastkd::scale_grad_")(_scale_grad_fake)
_register_one_pass("fastkd::kd_loss_fwd", _kd_loss_fwd_fake, torch.ops.fastkd.scale_grad_)
_register_channel_attention("fastkd::channel_attention_fwd", "fastkd::channel_attention_bwd")

if triton_status() is None:
    torch.library.register_fake("fastkd::scale_grad_triton_")(_scale_grad_fake)
    _register_one_pass(
        "fastkd::kd_loss_fwd_triton", _kd_loss_fwd_fake, torch.ops.fastkd.scale_grad_triton_
    )
    _register_channel_attention(
        "fastkd::channel_attention_fwd_triton", "fastkd::channel_attention_bwd_triton"
    )
