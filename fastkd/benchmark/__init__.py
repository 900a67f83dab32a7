"""fastkd's benchmark harness (``python -m fastkd bench``).

Every public module of this package is one loss's cases (``fastkd/benchmark/<loss>.py``, named
after the loss) and defines ``BENCH``, a :class:`LossBench`. The harness modules are private
(``_core``, ``_timing``, ``_runner``, ``_report``, ``_cli``). To benchmark a new loss, add its
module; the command line finds it by name.

Each measurement is the median time of one (case, mode, implementation), the fewest bytes the loss
must move in that mode, the achieved GB/s over those bytes and their ratio to the machine's copy
bandwidth measured in the same run (the roofline), speedups over PyTorch eager and
``torch.compile``, and the peak memory of a call on CUDA.
"""

from __future__ import annotations

import importlib
import pkgutil

from ._core import (
    DTYPES,
    MODES,
    PEERS,
    Case,
    Impl,
    Inputs,
    LossBench,
    Selection,
    Skip,
    parse_shape,
)
from ._runner import Runner, Settings


def available_losses() -> list[str]:
    """Names of the losses with benchmark cases."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load_loss(name: str) -> LossBench:
    """The cases of loss `name` (a module of this package)."""
    names = available_losses()
    if name not in names:
        raise ValueError(f"no benchmark cases for loss {name!r}; available: {', '.join(names)}")
    module = importlib.import_module(f"{__name__}.{name}")
    bench = getattr(module, "BENCH", None)
    if not isinstance(bench, LossBench):
        raise TypeError(f"{module.__name__}.BENCH must be a LossBench instance")
    return bench


__all__ = [
    "DTYPES",
    "MODES",
    "PEERS",
    "Case",
    "Impl",
    "Inputs",
    "LossBench",
    "Runner",
    "Selection",
    "Settings",
    "Skip",
    "available_losses",
    "load_loss",
    "parse_shape",
]
