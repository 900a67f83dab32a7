"""``fastkd.nn.KDLoss``: the module form of :func:`fastkd.kd_loss`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..functional.kd_loss import _check_options, _kd_loss
from ..sparse import SparseTeacher


class KDLoss(torch.nn.Module):
    """Knowledge-distillation loss ``T^2 KL(softmax(t/T) || softmax(s/T))``, optionally mixed
    with hard-label cross-entropy (``alpha``), guided (GKD) or over a teacher cohort; reverse KL
    or JSD(beta) in place of the KL with ``divergence``.

    Hyper-parameters are checked here, once, by the checks of :func:`fastkd.kd_loss` (see it for
    their meaning); each call checks only its tensors. The teacher may be a tensor, a
    :class:`fastkd.SparseTeacher` (its top-k classes per row) or a list mixing them.

    Example::

        criterion = fastkd.nn.KDLoss(temperature=4.0, alpha=0.9)
        loss = criterion(student(x), teacher(x), y)
        loss = criterion(student(x), fastkd.SparseTeacher(top_ids, top_log_probs), y)
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
        divergence: str = "forward_kl",
        beta: float = 0.5,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        options = _check_options(
            temperature=temperature, alpha=alpha, label_smoothing=label_smoothing, guided=guided,
            ignore_index=ignore_index, teacher_weights=teacher_weights, reduction=reduction,
            divergence=divergence, beta=beta, backend=backend,
        )
        self.temperature: float = options["temperature"]
        self.alpha: float | None = options["alpha"]
        self.label_smoothing: float = options["label_smoothing"]
        self.guided: bool = options["guided"]
        self.ignore_index: int = options["ignore_index"]
        self.teacher_weights: list[float] | None = options["teacher_weights"]
        self.reduction: str = options["reduction"]
        self.divergence: str = options["divergence"]
        self.beta: float = options["beta"]
        self.backend: str = options["backend"]

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor | SparseTeacher | Sequence[torch.Tensor | SparseTeacher],
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _kd_loss(
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
            divergence=self.divergence,
            beta=self.beta,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        cohort = ["guided=True"] if self.guided else []
        if self.teacher_weights is not None:
            cohort.append(f"teacher_weights={self.teacher_weights}")
        parts = kd_option_parts(self, cohort)
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)


def kd_option_parts(loss: torch.nn.Module, middle: Sequence[str] = ()) -> list[str]:
    """The ``extra_repr`` parts of the kd_loss options every KD module holds (temperature, alpha,
    label_smoothing, reduction, divergence, beta) that differ from their defaults, in kd_loss's
    argument order, with a module's own `middle` parts after label_smoothing."""
    parts = [f"temperature={loss.temperature}"]
    if loss.alpha is not None:
        parts.append(f"alpha={loss.alpha}")
    if loss.label_smoothing:
        parts.append(f"label_smoothing={loss.label_smoothing}")
    parts.extend(middle)
    if loss.reduction != "batchmean":
        parts.append(f"reduction={loss.reduction!r}")
    if loss.divergence != "forward_kl":
        parts.append(f"divergence={loss.divergence!r}")
    if loss.divergence == "jsd":
        parts.append(f"beta={loss.beta}")
    return parts
