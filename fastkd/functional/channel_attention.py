"""``fastkd.channel_attention_loss``: the channel-attention loss of Channel Distillation, fused.

For each (student, teacher) pair ``i`` of feature maps ``S_i [B, C, Hs, Ws]`` and
``T_i [B, C, Ht, Wt]``, channel attention is the global average pool over ``(H, W)``::

    w_s[b, c] = mean_{h, w} S_i[b, c, h, w]        w_t[b, c] = mean_{h, w} T_i[b, c, h, w]
    loss = sum_i weights[i] * mean_{b, c} (w_s[b, c] - w_t[b, c])^2     (reduction="mean")
    d loss / d S_i[b, c, h, w] = 2 * weights[i] * (w_s - w_t)[b, c] / (B * C * Hs * Ws)

``"sum"`` replaces the mean over ``(b, c)`` by a sum (and drops ``B * C`` from the gradient). The
teacher never receives a gradient.

The compiled backends run every pair of a call together: the forward reads each map once, in its
own memory format, and keeps only the ``[B, C]`` differences (already scaled into the gradient's
per-channel value); the backward writes each student's broadcast gradient once, in the student's
memory format.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import backends
from .._inputs import (
    check_choice,
    check_float_tensor,
    check_same_device,
    check_tensor_list,
    check_weights,
    weights_for,
)
from ..ops import ChannelAttentionLoss

REDUCTIONS = ("mean", "sum")


def channel_attention_loss(
    student_feats: torch.Tensor | Sequence[torch.Tensor],
    teacher_feats: torch.Tensor | Sequence[torch.Tensor],
    *,
    weights: Sequence[float] | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Channel-attention (Channel Distillation) loss: the weighted sum over pairs of the squared
    difference between the student's and the teacher's globally average-pooled feature maps.

    Args:
        student_feats: a ``[B, C, H, W]`` float32/bfloat16/float16 (float64 on CPU) feature map,
            or a list/tuple of them (e.g. one per ResNet stage), in any memory format.
        teacher_feats: the teacher's maps, one per student map, with the same ``B`` and ``C``;
            ``H``, ``W``, memory format and dtype may differ. Never differentiated.
        weights: one non-negative weight per pair (default all 1.0).
        reduction: ``"mean"`` (default; mean over ``B * C`` per pair) or ``"sum"``.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Returns:
        A float32 scalar (float64 for float64 maps).
    """
    options = _check_options(weights=weights, reduction=reduction, backend=backend)
    return _channel_attention_loss(student_feats, teacher_feats, **options)


def _check_options(*, weights: Sequence[float] | None, reduction: str, backend: str) -> dict:
    """The keyword arguments of `channel_attention_loss`, checked, as `_channel_attention_loss`
    takes them (the weights' count is checked against the pairs at each call)."""
    return {
        "weights": check_weights(weights, "weights"),
        "reduction": check_choice(reduction, "reduction", REDUCTIONS),
        "backend": check_choice(backend, "backend", backends.CHOICES),
    }


def _channel_attention_loss(
    student_feats: torch.Tensor | Sequence[torch.Tensor],
    teacher_feats: torch.Tensor | Sequence[torch.Tensor],
    *,
    weights: list[float] | None,
    reduction: str,
    backend: str,
) -> torch.Tensor:
    """`channel_attention_loss` with keyword arguments that `_check_options` returned
    (``fastkd.nn.ChannelAttentionLoss`` checks them once, when it is built); the tensors are
    checked here."""
    students, teachers = _check_args(student_feats, teacher_feats)
    w = weights_for(weights, len(students), "weights", "pair")
    chosen = _choose_backend(students, backend)
    if chosen == "torch":
        from ..reference import channel_attention_loss_ref

        return channel_attention_loss_ref(students, teachers, weights=w, reduction=reduction)
    if chosen == "triton":
        fwd = torch.ops.fastkd.channel_attention_fwd_triton
        bwd = torch.ops.fastkd.channel_attention_bwd_triton
    else:
        fwd, bwd = torch.ops.fastkd.channel_attention_fwd, torch.ops.fastkd.channel_attention_bwd
    mean = reduction == "mean"
    # The teacher is a constant: detached (a view), the loss of a student that does not require
    # grad does not either, even when a teacher does.
    teachers = [t.detach() for t in teachers]
    if torch.is_grad_enabled() and any(s.requires_grad for s in students):
        return ChannelAttentionLoss.apply(fwd, bwd, teachers, w, mean, *students)
    loss, _ = fwd(students, teachers, w, mean)
    return loss


def _check_args(
    student_feats: object, teacher_feats: object
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    students = check_tensor_list(student_feats, "student_feats")
    teachers = check_tensor_list(teacher_feats, "teacher_feats")
    if len(students) != len(teachers):
        raise ValueError(
            f"student_feats and teacher_feats must hold the same number of maps (one teacher map "
            f"per student map), got {len(students)} and {len(teachers)}"
        )
    single = isinstance(student_feats, torch.Tensor) and isinstance(teacher_feats, torch.Tensor)

    def name(which: str, i: int) -> str:
        return which if single else f"{which}[{i}]"

    for i, (s, t) in enumerate(zip(students, teachers, strict=True)):
        s_name, t_name = name("student_feats", i), name("teacher_feats", i)
        for x, x_name in ((s, s_name), (t, t_name)):
            check_float_tensor(x, x_name)
            if x.dim() != 4:
                raise ValueError(
                    f"{x_name} must be a 4-D [B, C, H, W] feature map, got {x.dim()}-D shape "
                    f"{tuple(x.shape)}"
                )
            if x.numel() == 0:
                raise ValueError(f"{x_name} must not be empty, got shape {tuple(x.shape)}")
            check_same_device(students[0], x, x_name, name("student_feats", 0))
        if t.shape[0] != s.shape[0]:
            raise ValueError(
                f"{t_name} has batch size {t.shape[0]} but {s_name} has {s.shape[0]}"
            )
        if t.shape[1] != s.shape[1]:
            raise ValueError(
                f"{t_name} has {t.shape[1]} channels but {s_name} has {s.shape[1]}; channel "
                "attention compares channels one to one (map the student to the teacher's "
                "channel count first, e.g. with a 1x1 convolution connector)"
            )
    f64 = {x.dtype == torch.float64 for x in students + teachers}
    if len(f64) > 1:
        raise TypeError(
            "float64 feature maps must be float64 for every student and teacher map alike, got "
            f"student_feats {[str(s.dtype) for s in students]} and teacher_feats "
            f"{[str(t.dtype) for t in teachers]}"
        )
    return students, teachers


def _choose_backend(students: list[torch.Tensor], requested: str) -> str:
    f64 = students[0].dtype == torch.float64

    def gpu_reason() -> str | None:
        return "float64 runs on the CPU backend only" if f64 else None

    return backends.choose(
        "channel_attention_loss",
        requested,
        students[0].device,
        {"cuda": gpu_reason, "triton": gpu_reason},
        dtype=students[0].dtype,
        size=sum(s.numel() for s in students),
    )
