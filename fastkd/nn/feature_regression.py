"""``fastkd.nn.FeatureRegressionLoss``: the module form of
:func:`fastkd.feature_regression_loss`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..functional.feature_regression import _check_options, _feature_regression_loss


class FeatureRegressionLoss(torch.nn.Module):
    """Weighted sum over (student, teacher) feature pairs of the mean ``|a - b|^p``, optionally
    between per-sample L2-normalised features: FitNet hints and Neighbourhood Distillation
    (``p=2``), FEED / Factor Transfer (``p=1, normalize=True``).

    Hyper-parameters are checked here, once, by the checks of
    :func:`fastkd.feature_regression_loss` (see it for their meaning); each call checks only its
    tensors.

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
        options = _check_options(
            p=p, normalize=normalize, weights=weights, reduction=reduction, backend=backend
        )
        self.p: int = options["p"]
        self.normalize: bool = options["normalize"]
        self.weights: list[float] | None = options["weights"]
        self.reduction: str = options["reduction"]
        self.backend: str = options["backend"]

    def forward(
        self,
        student_feats: torch.Tensor | Sequence[torch.Tensor],
        teacher_feats: torch.Tensor | Sequence[torch.Tensor],
    ) -> torch.Tensor:
        return _feature_regression_loss(
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
