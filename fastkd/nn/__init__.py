"""``nn.Module`` forms of the fastkd losses."""

from .feature_regression import FeatureRegressionLoss
from .kd_loss import KDLoss

__all__ = ["FeatureRegressionLoss", "KDLoss"]
