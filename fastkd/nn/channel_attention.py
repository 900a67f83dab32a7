"""``fastkd.nn.ChannelAttentionLoss``: the module form of :func:`fastkd.channel_attention_loss`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..functional.channel_attention import _channel_attention_loss, _check_options


class ChannelAttentionLoss(torch.nn.Module):
    """Channel-attention (Channel Distillation) loss over one or more feature-map pairs::

        loss = sum_i weights[i] * mean_{b, c} (mean_{h, w} S_i - mean_{h, w} T_i)^2

    Hyper-parameters are checked here, once, by the checks of
    :func:`fastkd.channel_attention_loss` (see it for their meaning); each call checks only its
    tensors.

    Example::

        criterion = fastkd.nn.ChannelAttentionLoss(weights=[1.0, 1.0, 1.0, 1.0])
        loss = criterion([connector(f) for connector, f in zip(connectors, student_stages)],
                         teacher_stages)
    """

    def __init__(
        self,
        weights: Sequence[float] | None = None,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        options = _check_options(weights=weights, reduction=reduction, backend=backend)
        self.weights: list[float] | None = options["weights"]
        self.reduction: str = options["reduction"]
        self.backend: str = options["backend"]

    def forward(
        self,
        student_feats: torch.Tensor | Sequence[torch.Tensor],
        teacher_feats: torch.Tensor | Sequence[torch.Tensor],
    ) -> torch.Tensor:
        return _channel_attention_loss(
            student_feats,
            teacher_feats,
            weights=self.weights,
            reduction=self.reduction,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        parts = []
        if self.weights is not None:
            parts.append(f"weights={self.weights}")
        if self.reduction != "mean":
            parts.append(f"reduction={self.reduction!r}")
        if self.backend != "auto":
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)
