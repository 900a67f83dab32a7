"""Functional forms of the fastkd losses (also exported as ``fastkd.<loss>``)."""

from .channel_attention import channel_attention_loss
from .feature_regression import feature_regression_loss
from .kd_loss import kd_loss
from .linear_kd_loss import linear_kd_loss

__all__ = ["channel_attention_loss", "feature_regression_loss", "kd_loss", "linear_kd_loss"]
