"""``nn.Module`` forms of the fastkd losses."""

from .kd_loss import KDLoss

__all__ = ["KDLoss"]
