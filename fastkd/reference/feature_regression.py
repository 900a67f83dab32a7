"""Plain-PyTorch feature regression: the test oracle (run in float64) and the ``"torch"`` backend.

Written straight from the definition in ``fastkd.feature_regression_loss``'s docstring and
docs/methods.md (#feed, #nd; ``F.normalize`` and autograd), independently of the fused kernels'
hand-derived gradients, so the two check each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

EPS = 1e-12


def feature_regression_loss_ref(
    student_feats: torch.Tensor | Sequence[torch.Tensor],
    teacher_feats: torch.Tensor | Sequence[torch.Tensor],
    *,
    p: int = 2,
    normalize: bool = False,
    weights: Sequence[float] | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Same arguments and result as :func:`fastkd.feature_regression_loss` (computed in float32,
    or float64 for float64 inputs); differentiable through autograd, the teacher detached."""
    students = [student_feats] if isinstance(student_feats, torch.Tensor) else list(student_feats)
    teachers = [teacher_feats] if isinstance(teacher_feats, torch.Tensor) else list(teacher_feats)
    weights = [1.0] * len(students) if weights is None else [float(w) for w in weights]
    acc = torch.float64 if students[0].dtype == torch.float64 else torch.float32
    total = torch.zeros((), dtype=acc, device=students[0].device)
    for s, t, w in zip(students, teachers, weights, strict=True):
        a = s.to(acc)
        b = t.detach().to(acc)
        if normalize:
            a = F.normalize(a.flatten(1), dim=1, eps=EPS)
            b = F.normalize(b.flatten(1), dim=1, eps=EPS)
        d = a - b
        err = d.abs() if p == 1 else d.square()
        total = total + w * (err.mean() if reduction == "mean" else err.sum())
    return total
