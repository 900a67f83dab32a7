"""Which implementation runs a loss: ``"cpu"`` (C++), ``"cuda"`` (CUDA C++), ``"triton"`` or
``"torch"`` (the plain-PyTorch reference).

Each loss describes, per backend, whether it can run the given inputs and if not, why. With
``backend="auto"`` (or the ``FASTKD_BACKEND`` environment variable, read when fastkd is imported)
the first backend in the preference order that accepts the inputs runs: the order for CUDA
tensors comes from the measured table ``fastkd/tuning/<loss>.json`` (per GPU, dtype and problem
size) when one is committed for the GPU in use, otherwise CUDA C++ first. An explicit request that
cannot be met raises an error listing every backend's reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from . import _C

# Every backend's name: the one list the functional forms, the modules, the benchmark and the
# trainer take their choices from.
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


def _load_triton() -> str | None:
    """None when the Triton kernels can run, else why not."""
    try:
        import triton  # noqa: F401

        from . import kernels  # noqa: F401
    except Exception as e:  # ImportError, or a Triton that fails to initialise
        return f"Triton is unavailable ({type(e).__name__}: {e})"
    return None


# Facts of this installation, fixed at import so that backend choice traces to constants under
# torch.compile. fastkd does not import without its extension (fastkd.ops registers the fake
# implementations of the extension's ops), so only its CUDA part can be missing.
EXTENSION_WITH_CUDA = bool(_C.with_cuda)
TRITON_REASON = _load_triton()


def triton_status() -> str | None:
    return TRITON_REASON


def device_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device`, or None. Loss-independent part of the checks."""
    if backend == "torch":
        return None
    if backend == "cpu":
        return None if device.type == "cpu" else f"tensors are on {device}, not the CPU"
    if backend == "cuda":
        if device.type != "cuda":
            return f"tensors are on {device}, not a CUDA device"
        return None if EXTENSION_WITH_CUDA else "the fastkd._C extension was built without CUDA"
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


_GPU_DEFAULT = ("cuda", "triton", "torch")
_TABLES: dict[str, dict] = {}


def _table(loss: str) -> dict:
    if loss not in _TABLES:
        path = _TUNING_DIR / f"{loss}.json"
        _TABLES[loss] = json.loads(path.read_text()) if path.exists() else {}
    return _TABLES[loss]


def measured_order(table: dict, device_name: str, dtype: str, size: int) -> tuple[str, ...]:
    """The backend order a tuning table gives for (GPU, dtype, problem size), or ().

    Table format (written by ``python -m fastkd tune``)::

        {"loss": "kd_loss", "size": "classes",
         "devices": [{"device": "NVIDIA H100 80GB HBM3",
                      "rules": [{"dtype": "bfloat16", "max_size": 4096,
                                 "order": ["triton", "cuda"]},
                                {"dtype": "*", "max_size": null,
                                 "order": ["cuda", "triton"]}]}]}

    The first rule whose dtype matches (``"*"``: any) and whose ``max_size`` is at least ``size``
    (``null``: unbounded) wins; ``size`` is the loss's own measure (classes for kd_loss).
    """
    for entry in table.get("devices", []):
        if entry.get("device") != device_name:
            continue
        for rule in entry.get("rules", []):
            if rule.get("dtype", "*") not in ("*", dtype):
                continue
            if rule.get("max_size") is None or size <= rule["max_size"]:
                return tuple(rule["order"])
    return ()


@torch.compiler.assume_constant_result
def preference(
    loss: str, device: torch.device, dtype: torch.dtype | None = None, size: int = 0
) -> tuple[str, ...]:
    """Backends to try, in order, for `loss` on `device` with inputs of `dtype` and problem size
    `size` (a constant under torch.compile)."""
    if device.type != "cuda":
        return ("cpu", "torch")
    name = torch.cuda.get_device_name(device)
    dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else "*"
    order = measured_order(_table(loss), name, dtype_name, int(size))
    return order + tuple(b for b in _GPU_DEFAULT if b not in order)


def choose(
    loss: str,
    requested: str,
    device: torch.device,
    input_reasons: Mapping[str, Callable[[], str | None]] | None = None,
    *,
    dtype: torch.dtype | None = None,
    size: int = 0,
) -> str:
    """Picks the backend for one call; `requested` is one of CHOICES (the caller checked it).

    `input_reasons` maps a backend to a function returning why it cannot run these particular
    inputs (beyond the device), or None. `dtype` and `size` select the measured winner from the
    tuning table (see `measured_order`).
    """
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
        for backend in preference(loss, device, dtype, size):
            if reason(backend) is None:
                return backend
    lines = "; ".join(f"{b}: {reason(b) or 'available'}" for b in BACKENDS)
    raise ValueError(
        f"fastkd.{loss}: backend={requested!r} cannot run these inputs ({lines})"
    )
