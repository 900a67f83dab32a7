"""fastkd: fused knowledge-distillation losses for PyTorch.

``fastkd.kd_loss`` (and ``fastkd.nn.KDLoss``) computes temperature-scaled KD -- with hard-label CE,
guided KD and teacher cohorts -- in one pass over the logits, on C++ CPU, CUDA and Triton kernels;
a teacher may be given by its top-k classes only (``fastkd.SparseTeacher``), and the KL may be
replaced by reverse KL or the generalised Jensen-Shannon divergence (``divergence=``).
``fastkd.linear_kd_loss`` (``fastkd.nn.LinearKDLoss``) fuses a language model's output head with it:
neither the student's nor the teacher's ``[N, C]`` logits are stored (``fastkd.LinearTeacher``).
``fastkd.channel_attention_loss`` (``fastkd.nn.ChannelAttentionLoss``) is Channel Distillation's
feature-map loss over every stage of a network in one fused call.
``fastkd.feature_regression_loss`` (``fastkd.nn.FeatureRegressionLoss``) regresses student feature
maps onto teacher maps (FitNet hints, neighbourhood distillation, FEED), all stages in one launch.
"""

import torch  # noqa: F401  (first: the extension fastkd._C links against torch's libraries)

from . import (
    memory,
    nn,
    ops,  # noqa: F401  (registers fake and autograd implementations)
    reference,
)
from .functional import (
    channel_attention_loss,
    feature_regression_loss,
    kd_loss,
    linear_kd_loss,
)
from .linear_teacher import LinearTeacher
from .sparse import SparseTeacher

__version__ = "0.1.0"

__all__ = [
    "LinearTeacher",
    "SparseTeacher",
    "channel_attention_loss",
    "feature_regression_loss",
    "kd_loss",
    "linear_kd_loss",
    "memory",
    "nn",
    "reference",
    "__version__",
]
