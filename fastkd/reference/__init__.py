"""Plain-PyTorch implementations of every fastkd loss: the float64 test oracle and the
``backend="torch"`` fallback. Names: ``fastkd.reference.<loss>_ref``."""

from .channel_attention import channel_attention_loss_ref
from .feature_regression import feature_regression_loss_ref
from .kd_loss import kd_loss_ref

__all__ = ["channel_attention_loss_ref", "feature_regression_loss_ref", "kd_loss_ref"]
