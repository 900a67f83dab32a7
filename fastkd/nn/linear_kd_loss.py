"""``fastkd.nn.LinearKDLoss``: the module form of :func:`fastkd.linear_kd_loss`."""

from __future__ import annotations

import torch

from ..functional.kd_loss import _check_options
from ..functional.linear_kd_loss import _check_chunk_size, _linear_kd_loss
from ..linear_teacher import LinearTeacher
from ..sparse import SparseTeacher
from .kd_loss import kd_option_parts


class LinearKDLoss(torch.nn.Module):
    """Knowledge distillation through the student's output head, fused with it: the loss of
    :func:`fastkd.kd_loss` on ``hidden @ weight.T + bias`` without storing those logits (see
    :func:`fastkd.linear_kd_loss`).

    Hyper-parameters are checked here, once; each call checks only its tensors. The teacher may be
    a tensor of logits, a :class:`fastkd.SparseTeacher` or a :class:`fastkd.LinearTeacher`.

    Example::

        criterion = fastkd.nn.LinearKDLoss(temperature=2.0, alpha=0.5)
        loss = criterion(
            s_hidden, student.lm_head.weight,
            fastkd.LinearTeacher(t_hidden, teacher.lm_head.weight), labels,
        )
    """

    def __init__(
        self,
        temperature: float = 1.0,
        alpha: float | None = None,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        reduction: str = "batchmean",
        chunk_size: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        options = _check_options(
            temperature=temperature, alpha=alpha, label_smoothing=label_smoothing, guided=False,
            ignore_index=ignore_index, teacher_weights=None, reduction=reduction,
            divergence=divergence, beta=beta, backend=backend,
        )
        if options["reduction"] == "none":
            raise ValueError(
                "reduction='none' is not supported by LinearKDLoss (see fastkd.linear_kd_loss); "
                "use 'batchmean', 'sum' or 'mean'"
            )
        self.temperature: float = options["temperature"]
        self.alpha: float | None = options["alpha"]
        self.label_smoothing: float = options["label_smoothing"]
        self.ignore_index: int = options["ignore_index"]
        self.divergence: str = options["divergence"]
        self.beta: float = options["beta"]
        self.reduction: str = options["reduction"]
        self.chunk_size: int | None = _check_chunk_size(chunk_size)
        self.backend: str = options["backend"]

    def forward(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher: torch.Tensor | SparseTeacher | LinearTeacher,
        labels: torch.Tensor | None = None,
        student_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _linear_kd_loss(
            student_hidden,
            student_weight,
            teacher,
            labels,
            student_bias=student_bias,
            chunk_size=self.chunk_size,
            temperature=self.temperature,
            alpha=self.alpha,
            label_smoothing=self.label_smoothing,
            guided=False,
            ignore_index=self.ignore_index,
            teacher_weights=None,
            reduction=self.reduction,
            divergence=self.divergence,
            beta=self.beta,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        parts = kd_option_parts(self)
        if self.chunk_size is not None:
            parts.append(f"chunk_size={self.chunk_size}")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)
