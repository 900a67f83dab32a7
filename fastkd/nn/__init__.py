"""``nn.Module`` forms of the fastkd losses."""

from .channel_attention import ChannelAttentionLoss
from .kd_loss import KDLoss

__all__ = ["ChannelAttentionLoss", "KDLoss"]
