"""Functional forms of the fastkd losses (also exported as ``fastkd.<loss>``)."""

from .feature_regression import feature_regression_loss
from .kd_loss import kd_loss

__all__ = ["feature_regression_loss", "kd_loss"]
