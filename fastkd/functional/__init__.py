"""Functional forms of the fastkd losses (also exported as ``fastkd.<loss>``)."""

from .kd_loss import kd_loss

__all__ = ["kd_loss"]
