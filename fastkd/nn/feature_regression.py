"""``fastkd.nn.FeatureRegressionLoss``: the module form of
:func:`fastkd.feature_regression_loss`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import backends
from .._inputs import check_choice, check_weights
from ..functional.feature_regression import REDUCTIONS, _check_p, feature_regression_loss


class FeatureRegressionLoss(torch.nn.Module):
    """Weighted sum over (student, teacher) feature pairs of the mean ``|a - b|^p``, optionally
    between per-sample L2-normalised features: FitNet hints and Neighbourhood Distillation
    (``p=2``), FEED / Factor Transfer (``p=1, normalize=True``).

    Hyper-parameters are checked here, once; see :func:`fastkd.feature_regression_loss` for their
    meaning.

    Example::

        criterion = fastkd.nn.FeatureRegressionLoss(p=1, normalize=True, weights=[500.0, 500.0])
        loss = criterion([t1(f_s), t2(f_s)], [f_t1, f_t2])
    """

    def __init__(
        self,
        p: int = 2,
        normalize: bool = False,
        weights: Sequence[float] | None = None,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.p = _check_p(p)
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        self.normalize = normalize
        self.weights = None if weights is None else check_weights(weights, len(weights), "weights")
        self.reduction = check_choice(reduction, "reduction", REDUCTIONS)
        self.backend = check_choice(backend, "backend", backends.CHOICES)

    def forward(
        self,
        student_feats: torch.Tensor | Sequence[torch.Tensor],
        teacher_feats: torch.Tensor | Sequence[torch.Tensor],
    ) -> torch.Tensor:
        return feature_regression_loss(
            student_feats,
            teacher_feats,
            p=self.p,
            normalize=self.normalize,
            weights=self.weights,
            reduction=self.reduction,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        parts = [f"p={self.p}"]
        if self.normalize:
            parts.append("normalize=True")
        if self.weights is not None:
            parts.append(f"weights={self.weights}")
        if self.reduction != "mean":
            parts.append(f"reduction={self.reduction!r}")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)
