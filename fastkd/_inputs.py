"""Argument checks and tensor layouts shared by every loss.

Every check raises ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, wrong value)
with a message that names the user's argument and what was expected. Checks only look at Python
values and tensor metadata (shape, dtype, device, strides), never at tensor contents, so they cost
no device synchronisation and trace under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_float_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}"
        )
    return x


def check_tensor_list(x: object, name: str) -> list[torch.Tensor]:
    """A tensor, or a non-empty list/tuple of tensors, as a list."""
    if isinstance(x, torch.Tensor):
        return [x]
    if not isinstance(x, (list, tuple)):
        raise TypeError(
            f"{name} must be a tensor or a list/tuple of tensors, got {type(x).__name__}"
        )
    if len(x) == 0:
        raise ValueError(f"{name} must not be an empty list")
    return [check_float_tensor(t, f"{name}[{i}]") for i, t in enumerate(x)]


def check_real(
    x: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    """A finite Python number (not a bool) within [low, high] (or (low, high] with low_open)."""
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__}")
    value = float(x)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_choice(x: object, name: str, choices: Sequence[str]) -> str:
    if not isinstance(x, str) or x not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {x!r}")
    return x


def check_weights(weights: object, name: str) -> list[float] | None:
    """None, or non-negative finite numbers (a list/tuple or a 1-D tensor) as a list of floats.
    How many there must be depends on the call's tensors: see `weights_for`."""
    if weights is None:
        return None
    if isinstance(weights, torch.Tensor):
        if weights.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(weights.shape)}")
        weights = weights.tolist()
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of numbers, got {type(weights).__name__}")
    return [check_real(w, f"{name}[{i}]", low=0.0) for i, w in enumerate(weights)]


def weights_for(weights: list[float] | None, count: int, name: str, per: str) -> list[float]:
    """`count` weights, one per `per` (``"pair"``, ``"teacher"``), from the result of
    `check_weights`: all 1.0 when none were given."""
    if weights is None:
        return [1.0] * count
    if len(weights) != count:
        raise ValueError(f"{name} must hold {count} values (one per {per}), got {len(weights)}")
    return weights


def check_same_device(ref: torch.Tensor, x: torch.Tensor, name: str, ref_name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def _mergeable(sizes: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether dims with these sizes/strides can be viewed as one dim without a copy."""
    expected = None
    for size, stride in zip(reversed(sizes), reversed(strides), strict=True):
        if size == 1:
            continue
        if expected is not None and stride != expected:
            return False
        expected = stride * size
    return True


def as_rows3d(x: torch.Tensor) -> torch.Tensor:
    """Views logits ``[..., C]`` as ``[outer, inner, C]`` with the class dim contiguous.

    Rows are addressed as ``(b // inner) * stride(0) + (b % inner) * stride(1)``, so a ``[B, C]``
    tensor with any row stride, or a ``[B, L, C]`` slice such as ``logits[:, :-1]``, reaches the
    kernels without a copy. Only leading dims that cannot be folded into one stride, or a class dim
    with a stride other than 1, are copied.
    """
    if x.dim() == 1:
        x = x.view(1, 1, -1)
    elif x.dim() == 2:
        x = x.unsqueeze(1)
    elif x.dim() > 3:
        if _mergeable(x.shape[:-2], x.stride()[:-2]):
            x = x.view(-1, x.shape[-2], x.shape[-1])
        else:
            x = x.reshape(-1, x.shape[-2], x.shape[-1])
    if x.shape[-1] != 1 and x.stride(-1) != 1:
        x = x.contiguous()
    return x


def sample_blocked(x: torch.Tensor) -> bool:
    """Whether `x` is dense and sample ``b`` (dim 0) occupies the storage elements
    ``[b * D, (b + 1) * D)``, ``D = numel / B`` -- true of contiguous and channels_last tensors, in
    any order inside a sample. Kernels then read each sample as one flat block."""
    dims = sorted((st, sz) for sz, st in zip(x.shape, x.stride(), strict=True) if sz != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return x.dim() == 0 or x.shape[0] <= 1 or x.stride(0) * x.shape[0] == x.numel()


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one shape place every element at the same storage offset."""
    return all(
        sa == sb
        for size, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True)
        if size != 1
    )
