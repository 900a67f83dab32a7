"""``fastkd.nn.KDLoss``: the module form of :func:`fastkd.kd_loss`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import backends
from .._inputs import check_choice, check_real, check_weights
from ..functional.kd_loss import REDUCTIONS, kd_loss


class KDLoss(torch.nn.Module):
    """Knowledge-distillation loss ``T^2 KL(softmax(t/T) || softmax(s/T))``, optionally mixed
    with hard-label cross-entropy (``alpha``), guided (GKD) or over a teacher cohort.

    Hyper-parameters are checked here, once; see :func:`fastkd.kd_loss` for their meaning.

    Example::

        criterion = fastkd.nn.KDLoss(temperature=4.0, alpha=0.9)
        loss = criterion(student(x), teacher(x), y)
    """

    def __init__(
        self,
        temperature: float = 1.0,
        alpha: float | None = None,
        label_smoothing: float = 0.0,
        guided: bool = False,
        ignore_index: int = -100,
        teacher_weights: Sequence[float] | None = None,
        reduction: str = "batchmean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.temperature = check_real(temperature, "temperature", low=0.0, low_open=True)
        self.alpha = None if alpha is None else check_real(alpha, "alpha", low=0.0, high=1.0)
        self.label_smoothing = check_real(label_smoothing, "label_smoothing", low=0.0, high=1.0)
        if label_smoothing != 0 and alpha is None:
            raise ValueError(
                "label_smoothing applies to the cross-entropy term, which needs alpha "
                "(got alpha=None)"
            )
        if not isinstance(guided, bool):
            raise TypeError(f"guided must be a bool, got {type(guided).__name__}")
        self.guided = guided
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        self.ignore_index = ignore_index
        # Their count is checked against the teachers at each call.
        self.teacher_weights = (
            None if teacher_weights is None
            else check_weights(teacher_weights, None, "teacher_weights")
        )
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)
        self.backend = check_choice(backend, "backend", backends.CHOICES)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | Sequence[torch.Tensor],
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return kd_loss(
            student_logits,
            teacher_logits,
            labels,
            temperature=self.temperature,
            alpha=self.alpha,
            label_smoothing=self.label_smoothing,
            guided=self.guided,
            ignore_index=self.ignore_index,
            teacher_weights=self.teacher_weights,
            reduction=self.reduction,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        parts = [f"temperature={self.temperature}"]
        if self.alpha is not None:
            parts.append(f"alpha={self.alpha}")
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.guided:
            parts.append("guided=True")
        if self.teacher_weights is not None:
            parts.append(f"teacher_weights={self.teacher_weights}")
        if self.reduction != "batchmean":
            parts.append(f"reduction={self.reduction!r}")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)
