"""fastkd: fused knowledge-distillation losses for PyTorch.

``fastkd.kd_loss`` (and ``fastkd.nn.KDLoss``) computes temperature-scaled KD -- with hard-label CE,
guided KD and teacher cohorts -- in one pass over the logits, on C++ CPU, CUDA and Triton kernels.
"""

from . import (
    nn,
    ops,  # noqa: F401  (registers fake and autograd implementations)
    reference,
)
from .functional import kd_loss

__version__ = "0.1.0"

__all__ = ["kd_loss", "nn", "reference", "__version__"]
