"""``nn.Module`` forms of the fastkd losses."""

from .channel_attention import ChannelAttentionLoss
from .feature_regression import FeatureRegressionLoss
from .kd_loss import KDLoss
from .linear_kd_loss import LinearKDLoss

__all__ = ["ChannelAttentionLoss", "FeatureRegressionLoss", "KDLoss", "LinearKDLoss"]
