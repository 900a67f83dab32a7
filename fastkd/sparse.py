"""``fastkd.SparseTeacher``: a teacher given by its top-k classes only.

A sparse teacher stands for one dense teacher logit vector ``d`` over the student's ``C`` classes,
per row::

    d[ids[i]] = v_i                     for the k ids of the row (i < k)
    d[c]      = tail                    for every other class
    v_i       = values[i]               (kind="logits" or "log_probs")
    v_i       = log(values[i])          (kind="probs")
    tail      = log(m / (C - k)),  m = max(0, 1 - sum_i exp(v_i))   (tail="uniform")
    tail      = -inf                                               (tail="none")

``values`` are the teacher at temperature 1. ``tail="uniform"`` spreads the probability the k
classes leave over the other ``C - k`` classes evenly (``m = 0`` or ``k = C``: no tail); it needs
``values`` that are probabilities or log-probabilities over all ``C`` classes, i.e. ``kind`` is
``"log_probs"`` or ``"probs"``. ``tail="none"`` gives the other classes probability 0, so the
target is the teacher renormalised over its k classes; it is the only tail of ``kind="logits"``.

``fastkd.kd_loss`` treats a sparse teacher exactly as the dense teacher ``d``: ``softmax(d / T)``
is its target at temperature ``T``, its argmax (lowest class id on ties; the tail may exceed a
value) decides guided KD, and every other option means what it means for ``d``. With ``k = C`` it
is the dense teacher ``values`` scattered to ``ids``. The compiled backends never build ``d``: a row
costs O(k) teacher reads instead of O(C) (see csrc/kd_loss.h); the ``"torch"`` reference backend
builds it.

The ids of a row must be distinct (duplicates are invalid input: the reference backend raises,
the fused kernels do not look) and in ``[0, C)`` (checked as labels are: an error on the CPU, a
NaN loss on a GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KINDS = ("logits", "log_probs", "probs")
TAILS = ("uniform", "none")
ID_DTYPES = (torch.int32, torch.int64)
VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True, eq=False)
class SparseTeacher:
    """A teacher known on k classes per row: ``indices[..., i]`` holds a class id and
    ``values[..., i]`` the teacher's logit, log-probability or probability (``kind``) of it, at
    temperature 1. The other classes get one constant per row (``tail``); see the module docstring
    for the exact dense teacher this stands for.

    Args:
        indices: int32 or int64 ``[..., k]``, distinct class ids per row, ``0 <= id < C``; the
            leading dims are the student's (``[B, k]`` for ``[B, C]`` logits, ``[B, L, k]`` for
            ``[B, L, C]`` token logits).
        values: float ``[..., k]`` (float32, bfloat16, float16; float64 too), same shape.
        kind: ``"log_probs"`` (log-softmax over all C classes, default), ``"probs"`` or
            ``"logits"``.
        tail: ``"uniform"`` (the mass outside the k classes spread evenly, default) or ``"none"``
            (probability 0 outside them; required for ``kind="logits"``).

    Example::

        with torch.inference_mode():
            top = fastkd.SparseTeacher.from_logits(teacher(x), k=64)   # or ids/values from disk
        loss = fastkd.kd_loss(student(x), top, labels, temperature=2.0, alpha=0.5)
    """

    indices: torch.Tensor
    values: torch.Tensor
    kind: str = "log_probs"
    tail: str = "uniform"

    def __init__(
        self,
        indices: torch.Tensor,
        values: torch.Tensor,
        *,
        kind: str = "log_probs",
        tail: str = "uniform",
    ) -> None:
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
        if indices.dtype not in ID_DTYPES:
            raise TypeError(
                f"indices must be an int32 or int64 tensor of class ids, got {indices.dtype}"
            )
        if values.dtype not in VALUE_DTYPES:
            raise TypeError(
                f"values must be a float32, bfloat16, float16 or float64 tensor, got {values.dtype}"
            )
        if indices.shape != values.shape:
            raise ValueError(
                f"indices and values must have one shape [..., k], got {tuple(indices.shape)} and "
                f"{tuple(values.shape)}"
            )
        if indices.dim() == 0:
            raise ValueError("indices and values must have a last dim of k classes, got 0-d")
        if indices.shape[-1] == 0:
            raise ValueError(
                f"a sparse teacher needs k >= 1 classes per row, got indices of shape "
                f"{tuple(indices.shape)}"
            )
        if indices.device != values.device:
            raise ValueError(f"indices are on {indices.device} but values are on {values.device}")
        if not isinstance(kind, str) or kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
        if not isinstance(tail, str) or tail not in TAILS:
            raise ValueError(f"tail must be one of {', '.join(map(repr, TAILS))}, got {tail!r}")
        if kind == "logits" and tail == "uniform":
            raise ValueError(
                "tail='uniform' spreads the probability left outside the k classes, which logits "
                "do not determine: pass kind='log_probs' or 'probs', or tail='none'"
            )
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "tail", tail)

    @property
    def k(self) -> int:
        """Classes per row."""
        return self.indices.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """The leading dims (the student's ``shape[:-1]``)."""
        return self.indices.shape[:-1]

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __repr__(self) -> str:
        return (
            f"SparseTeacher(indices={tuple(self.indices.shape)} {self.indices.dtype}, "
            f"values={tuple(self.values.shape)} {self.values.dtype}, kind={self.kind!r}, "
            f"tail={self.tail!r})"
        )

    @classmethod
    def from_logits(
        cls, teacher_logits: torch.Tensor, k: int, *, kind: str = "log_probs"
    ) -> SparseTeacher:
        """The k classes of largest logit of a dense teacher ``[..., C]``, with float32 values:
        log-probabilities (default; ``log_softmax`` over all C classes) or probabilities, tail
        ``"uniform"``; or the raw logits (``kind="logits"``), tail ``"none"``. Indices are int64
        (``topk``'s), detached from any graph.

        With ``kind="log_probs"`` the log-sum-exp over the row is taken as ``max + log1p(rest)``,
        so a confident teacher keeps the digits of ``1 - p_max`` that the uniform tail is made of.
        """
        if not isinstance(teacher_logits, torch.Tensor):
            raise TypeError(
                f"teacher_logits must be a torch.Tensor, got {type(teacher_logits).__name__}"
            )
        if teacher_logits.dtype not in VALUE_DTYPES:
            raise TypeError(
                f"teacher_logits must be float32, bfloat16, float16 or float64, got "
                f"{teacher_logits.dtype}"
            )
        if teacher_logits.dim() == 0:
            raise ValueError("teacher_logits must have a class dimension, got a 0-d tensor")
        classes = teacher_logits.shape[-1]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= classes:
            raise ValueError(f"k must be an int in [1, {classes}] (the class count), got {k!r}")
        if not isinstance(kind, str) or kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
        t = teacher_logits.detach().float()
        top, ids = t.topk(k, dim=-1)
        if kind == "logits":
            return cls(ids, top, kind="logits", tail="none")
        # log p = (t - max) - log1p(rest): the max's own log-probability keeps its digits
        # (-1e-13, say) instead of rounding to 0 against a log-sum-exp of the row's size.
        log_probs = (top - top[..., :1]) - _log1p_rest(t, top[..., :1], ids[..., :1])
        if kind == "probs":
            return cls(ids, log_probs.exp(), kind="probs", tail="uniform")
        return cls(ids, log_probs, kind="log_probs", tail="uniform")

    def _for_kernel(
        self, classes: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the kernels read (csrc/kd_loss.h): int32 ids ``[rows, k]``, values ``[rows, k]``
        in log space (the logits or log-probabilities as given, ``log`` of probabilities) and the
        tail constant ``[rows]``, contiguous, values and tails in `dtype` (the accumulation dtype:
        float32, float64 for float64 students). A few O(rows * k) ops, no host sync."""
        k = self.k
        ids = self.indices.reshape(-1, k)
        if ids.dtype != torch.int32:
            # An int64 id past int32 would wrap into range: an id outside [0, C) becomes -1, which
            # the backends refuse as they would the original.
            ids = torch.where((ids >= 0) & (ids < classes), ids, -1).to(torch.int32)
        ids = ids.contiguous()
        # Detached: a teacher never receives a gradient.
        values = self.values.detach().reshape(-1, k).to(dtype)
        log_values = values.log() if self.kind == "probs" else values
        if self.tail == "none" or k >= classes:
            tails = torch.full(ids.shape[:1], -math.inf, dtype=dtype, device=values.device)
        else:
            # The mass outside the k classes, 1 - sum(p), cancels: it is taken in float64 from the
            # values as given (O(rows * k)), so a small tail keeps its digits -- a temperature
            # T > 1 raises it to the power 1/T, and float64 values can carry it below 1e-7.
            exact = self.values.detach().reshape(-1, k).double()
            if self.kind == "probs":
                mass = 1.0 - exact.sum(-1)
            else:
                vmax, first = exact.max(-1, keepdim=True)
                lse = vmax + _log1p_rest(exact, vmax, first)
                mass = -torch.expm1(lse).squeeze(-1)
            tails = (mass.clamp_min(0.0).log() - math.log(classes - k)).to(dtype)
        return ids, log_values.contiguous(), tails


def _log1p_rest(x: torch.Tensor, xmax: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """``log sum exp(x) - xmax`` over the last dim (kept, size 1), given the maximum `xmax` and the
    index `first` of one maximal entry (both ``[..., 1]``), as ``log1p(sum of the others' exp(x -
    xmax))``: exact to the last digit when the maximum holds nearly all the mass, where
    ``log(1 + tiny)`` would round the sum to 1 first. ``0`` for an all ``-inf`` row."""
    safe = torch.where(torch.isfinite(xmax), xmax, 0.0)
    others = torch.exp(x - safe).scatter(-1, first, 0.0).sum(-1, keepdim=True)
    return torch.log1p(others)
