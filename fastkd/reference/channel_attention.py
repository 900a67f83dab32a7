"""Plain-PyTorch channel-attention loss (Channel Distillation): the test oracle (run in float64)
and the ``"torch"`` backend.

Written straight from docs/methods.md#cd, independently of the fused kernels' coefficient plan.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def channel_attention_loss_ref(
    student_feats: torch.Tensor | Sequence[torch.Tensor],
    teacher_feats: torch.Tensor | Sequence[torch.Tensor],
    *,
    weights: Sequence[float] | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Same arguments and result as :func:`fastkd.channel_attention_loss` (computed in float32, or
    float64 for float64 student maps); differentiable through autograd, the teacher detached."""
    students = [student_feats] if isinstance(student_feats, torch.Tensor) else list(student_feats)
    teachers = [teacher_feats] if isinstance(teacher_feats, torch.Tensor) else list(teacher_feats)
    weights = [1.0] * len(students) if weights is None else list(weights)
    acc = torch.float64 if students[0].dtype == torch.float64 else torch.float32
    total = torch.zeros((), dtype=acc, device=students[0].device)
    for s, t, w in zip(students, teachers, weights, strict=True):
        w_s = s.mean(dim=(2, 3), dtype=acc)
        w_t = t.detach().mean(dim=(2, 3), dtype=acc)
        sq = (w_s - w_t).square()
        total = total + float(w) * (sq.mean() if reduction == "mean" else sq.sum())
    return total
