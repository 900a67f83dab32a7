"""``nn.Module`` forms of the fastkd losses."""

from .channel_attention import ChannelAttentionLoss
from .feature_regression import FeatureRegressionLoss
from .kd_loss import KDLoss

__all__ = ["ChannelAttentionLoss", "FeatureRegressionLoss", "KDLoss"]
