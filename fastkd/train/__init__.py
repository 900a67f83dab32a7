"""fastkd's reference trainer: distil students with every method fastkd serves.

Command line: ``python -m fastkd.train --help`` (or ``fastkd-train``). From Python::

    from fastkd.train import Config, train
    result = train(Config(method="kd", epochs=10, output="runs/kd"))
    print(result.val_top1)
"""

from .checkpoint import CheckpointError
from .config import METHODS, Config, ConfigError, parse_args
from .engine import Interrupted, NonFiniteLoss, RunResult, train
from .store import StoreError
from .topk import partial_teacher, partial_teacher_logits

__all__ = [
    "METHODS",
    "CheckpointError",
    "Config",
    "ConfigError",
    "Interrupted",
    "NonFiniteLoss",
    "RunResult",
    "StoreError",
    "parse_args",
    "partial_teacher",
    "partial_teacher_logits",
    "train",
]
