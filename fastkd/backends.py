"""Which implementation runs a loss: ``"cpu"`` (C++), ``"cuda"`` (CUDA C++), ``"triton"`` or
``"torch"`` (the plain-PyTorch reference).

Each loss describes, per backend, whether it can run the given inputs and if not, why. With
``backend="auto"`` (or the ``FASTKD_BACKEND`` environment variable, read when fastkd is imported)
the first backend in the preference order that accepts the inputs runs: the order for CUDA tensors
comes from the measured table ``fastkd/tuning/<loss>.json`` when one is committed for the GPU in
use, otherwise CUDA C++ first. An explicit request that cannot be met raises an error listing every
backend's reason.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

BACKENDS = ("cpu", "cuda", "triton", "torch")
CHOICES = ("auto",) + BACKENDS

_ENV_BACKEND = os.environ.get("FASTKD_BACKEND", "auto")
if _ENV_BACKEND not in CHOICES:
    raise ValueError(
        f"FASTKD_BACKEND must be one of {', '.join(CHOICES)}, got {_ENV_BACKEND!r}"
    )

# Triton kernels run on CPU tensors only through Triton's interpreter, which must be switched on
# before the kernels are defined.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_TUNING_DIR = Path(__file__).parent / "tuning"


@functools.cache
def extension_status() -> tuple[bool, bool, str]:
    """(C++ ops loaded, CUDA kernels built, reason when not)."""
    try:
        from . import _C
    except ImportError as e:  # pragma: no cover - a broken install
        return False, False, f"the fastkd._C extension failed to load ({e})"
    return True, bool(_C.with_cuda), "the fastkd._C extension was built without CUDA"


@functools.cache
def triton_status() -> str | None:
    """None when Triton kernels can run, else why not."""
    try:
        import triton  # noqa: F401

        from . import kernels  # noqa: F401
    except Exception as e:  # ImportError, or a Triton that fails to initialise
        return f"Triton is unavailable ({type(e).__name__}: {e})"
    return None


def device_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device`, or None. Loss-independent part of the checks."""
    loaded, with_cuda, why_not = extension_status()
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"tensors are on {device}, not the CPU"
        return None if loaded else why_not
    if backend == "cuda":
        if device.type != "cuda":
            return f"tensors are on {device}, not a CUDA device"
        if not loaded or not with_cuda:
            return why_not
        return None
    if backend == "triton":
        reason = triton_status()
        if reason is not None:
            return reason
        if device.type == "cuda":
            return None
        if device.type == "cpu" and TRITON_INTERPRET:
            return None
        return (
            f"tensors are on {device}; Triton runs on CUDA (or on the CPU under TRITON_INTERPRET=1)"
        )
    raise AssertionError(backend)


@functools.cache
def _measured_order(loss: str, device_name: str) -> tuple[str, ...] | None:
    """The backend order a committed tuning table gives for this GPU, if any."""
    path = _TUNING_DIR / f"{loss}.json"
    if not path.exists():
        return None
    table = json.loads(path.read_text())
    for entry in table.get("devices", []):
        if entry.get("device") == device_name:
            return tuple(entry["order"])
    return None


def preference(loss: str, device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        measured = _measured_order(loss, name)
        if measured is not None:
            return measured + tuple(b for b in ("cuda", "triton", "torch") if b not in measured)
        return ("cuda", "triton", "torch")
    return ("cpu", "torch")


def choose(
    loss: str,
    requested: str,
    device: torch.device,
    input_reasons: Mapping[str, Callable[[], str | None]] | None = None,
) -> str:
    """Picks the backend for one call.

    `input_reasons` maps a backend to a function returning why it cannot run these particular
    inputs (beyond the device), or None.
    """
    if requested not in CHOICES:
        raise ValueError(
            f"backend must be one of {', '.join(map(repr, CHOICES))}, got {requested!r}"
        )
    if requested == "auto":
        requested = _ENV_BACKEND

    def reason(backend: str) -> str | None:
        r = device_reason(backend, device)
        if r is None and input_reasons is not None and backend in input_reasons:
            r = input_reasons[backend]()
        return r

    if requested != "auto":
        if reason(requested) is None:
            return requested
    else:
        for backend in preference(loss, device):
            if reason(backend) is None:
                return backend
    lines = "; ".join(f"{b}: {reason(b) or 'available'}" for b in BACKENDS)
    raise ValueError(
        f"fastkd.{loss}: backend={requested!r} cannot run these inputs ({lines})"
    )
