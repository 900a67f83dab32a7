"""Fake (meta) implementations of every fastkd op, and the autograd of the fused losses.

The C++ kernels (``fastkd._C``) and the Triton kernels (``fastkd.kernels``) register the device
implementations; this module adds what ``torch.compile`` and ``opcheck`` need, in one place.

One-pass losses (``*_fwd`` ops returning ``(loss, grad)``) write the student's gradient while they
read the inputs. The ops themselves are not differentiable: ``OnePassLoss`` (an
``autograd.Function``) runs one with the gradient requested and keeps it; its backward scales that
saved gradient in place by ``grad_output`` with ``scale_grad_``, which returns at once (reading the
scalar on the device, no host sync) when ``grad_output`` is exactly 1 -- the common
``loss.backward()``. Because the saved gradient is consumed in place, a second backward through the
same graph (``retain_graph=True``) is refused by autograd's saved-tensor version check instead of
returning a wrongly scaled gradient. ``OnePassGroupLoss`` does the same for ops over a list of
students (feature regression): the forward writes one gradient per student that requires grad, in
one launch, and the backward scales them all with one grouped ``scale_grads_`` call.

Why not ``torch.library.register_autograd`` on the ops: with the gradient as an op output that the
backward mutates, AOTAutograd's partitioner rejects the traced graph (``opcheck``'s
``test_aot_dispatch_*``), and the wrapper's argument handling cost more host time per call than the
kernel itself on a 64 x 100 batch. Pure ops under an ``autograd.Function`` pass every ``opcheck``
test, trace under ``torch.compile(fullgraph=True)`` and add only autograd's own per-call cost.

Channel attention is not one-pass: its gradient is one value per (b, c) broadcast over H x W, so
the forward op keeps only those values (``diff``, a few KiB) and a backward op writes the
broadcast gradient, once, when autograd asks for it -- storing a full-size gradient from the
forward would double the bytes moved. ``ChannelAttentionLoss`` (an ``autograd.Function``, for
the host-time reason above: about 80 us less per call than ``register_autograd``) connects them;
nothing is consumed in place, so its backward can run more than once (``retain_graph=True``).
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (op schemas and C++ kernels)
from .backends import triton_status


def _kd_loss_fwd_fake(
    student, teachers, labels, kd_row_weights, ce_row_weights, kd_coefs, ce_coef, temperature,
    label_smoothing, ignore_index, per_row, compute_grad, sparse_ids, sparse_values, sparse_tails,
    divergence=0, beta=0.5,
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


def _feature_regression_fwd_fake(students, teachers, weights, p, normalize, mean, compute_grad):
    dtype = torch.float64 if students[0].dtype == torch.float64 else torch.float32
    loss = students[0].new_empty((), dtype=dtype)
    # empty_like keeps a dense student's strides, as the kernels' allocation does.
    grads = [
        torch.empty_like(s) if g else s.new_empty((0,))
        for s, g in zip(students, compute_grad, strict=True)
    ]
    return loss, grads


def _scale_grads_fake(grads, grad_output):
    return None


class OnePassGroupLoss(torch.autograd.Function):
    """Differentiates ``fwd(students, *args, compute_grad) -> (loss, grads)`` w.r.t. a list of
    students, the gradients written by the forward.

    Call as ``OnePassGroupLoss.apply(fwd, scale_grads_, args, compute_grad, *students)``: ``args``
    is the tuple of the op's arguments between the students and ``compute_grad``, one flag per
    student (True where it requires grad). The backward scales every computed gradient in place
    with one ``scale_grads_`` call; the other students get None.
    """

    @staticmethod
    def forward(ctx, fwd, scale_grads_, args, compute_grad, *students):
        loss, grads = fwd(list(students), *args, compute_grad)
        ctx.scale_grads_ = scale_grads_
        ctx.compute_grad = compute_grad
        ctx.save_for_backward(*[g for g, f in zip(grads, compute_grad, strict=True) if f])
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = ctx.saved_tensors
        if grad_loss.dtype not in (torch.float32, torch.float64):
            grad_loss = grad_loss.float()
        ctx.scale_grads_(list(grads), grad_loss.contiguous())
        it = iter(grads)
        return (None, None, None, None, *[next(it) if f else None for f in ctx.compute_grad])


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


class ChannelAttentionLoss(torch.autograd.Function):
    """Differentiates ``fwd(students, teachers, weights, mean) -> (loss, diff)`` w.r.t. the
    students with ``bwd(diffs, grad_output, sizes, channels_last, dtype) -> grads``.

    Call as ``ChannelAttentionLoss.apply(fwd, bwd, teachers, weights, mean, *students)``. ``diff``
    is every pair's ``[B, C]`` block of per-channel gradient values (concatenated); the backward
    broadcasts ``grad_output * diff`` into each student's shape, dtype and memory format -- only for
    the students that require grad, one ``bwd`` call per student dtype (in practice one call).
    """

    @staticmethod
    def forward(ctx, fwd, bwd, teachers, weights, mean, *students):
        loss, diff = fwd(list(students), teachers, weights, mean)
        ctx.bwd = bwd
        ctx.sizes = [tuple(s.shape) for s in students]
        ctx.channels_last = [grad_channels_last(s) for s in students]
        ctx.dtypes = [s.dtype for s in students]
        ctx.save_for_backward(diff)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (diff,) = ctx.saved_tensors
        needed = ctx.needs_input_grad[5:]
        grads = [None] * len(ctx.sizes)
        blocks = diff.split([size[0] * size[1] for size in ctx.sizes])
        if grad_loss.dtype not in (torch.float32, torch.float64):
            grad_loss = grad_loss.float()
        for dtype in dict.fromkeys(ctx.dtypes):
            wanted = [i for i, n in enumerate(needed) if n and ctx.dtypes[i] == dtype]
            if not wanted:
                continue
            computed = ctx.bwd(
                [blocks[i].view(ctx.sizes[i][0], ctx.sizes[i][1]) for i in wanted],
                grad_loss,
                [n for i in wanted for n in ctx.sizes[i]],
                [ctx.channels_last[i] for i in wanted],
                dtype,
            )
            for i, g in zip(wanted, computed, strict=True):
                grads[i] = g
        return (None, None, None, None, None, *grads)


def _register_channel_attention_fakes(fwd: str, bwd: str) -> None:
    torch.library.register_fake(fwd)(_channel_attention_fwd_fake)
    torch.library.register_fake(bwd)(_channel_attention_bwd_fake)


torch.library.register_fake("fastkd::kd_loss_fwd")(_kd_loss_fwd_fake)
torch.library.register_fake("fastkd::scale_grad_")(_scale_grad_fake)
torch.library.register_fake("fastkd::feature_regression_fwd")(_feature_regression_fwd_fake)
torch.library.register_fake("fastkd::scale_grads_")(_scale_grads_fake)
_register_channel_attention_fakes("fastkd::channel_attention_fwd", "fastkd::channel_attention_bwd")

if triton_status() is None:
    torch.library.register_fake("fastkd::kd_loss_fwd_triton")(_kd_loss_fwd_fake)
    torch.library.register_fake("fastkd::scale_grad_triton_")(_scale_grad_fake)
    torch.library.register_fake("fastkd::feature_regression_fwd_triton")(
        _feature_regression_fwd_fake
    )
    torch.library.register_fake("fastkd::scale_grads_triton_")(_scale_grads_fake)
    _register_channel_attention_fakes(
        "fastkd::channel_attention_fwd_triton", "fastkd::channel_attention_bwd_triton"
    )
