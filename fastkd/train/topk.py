"""Partial teacher (Tang et al. 2020, docs/methods.md section 6): keep the teacher's top-k
probabilities.

With ``p = softmax(t / T)`` over ``C`` classes and ``K`` the indices of its ``k`` largest entries,
the target is

    r_c = p_c                                   for c in K
    r_c = (1 - sum_{j in K} p_j) / (C - k)      otherwise

so ``r`` sums to 1, agrees with ``p`` where the teacher is confident and spreads the rest of the
mass uniformly. ``fastkd.kd_loss`` takes teacher *logits*, so the target is handed over as
``z = T * log r`` (``-inf`` where ``r_c = 0``): ``softmax(z / T) = r / sum(r) = r``, and the loss
``T^2 KL(r || q)`` has the usual gradient ``(T / B)(q - r)``.

For ``k >= C`` the target is the full teacher distribution. The computation runs in float32 (the
teacher's logits may be bfloat16 under autocast), returns float32, and costs one softmax, one top-k
and one log per row -- negligible next to the teacher's forward.

The trainer hands the same target to ``fastkd.kd_loss`` as a sparse teacher instead
(:func:`partial_teacher`): the k kept classes and one tail constant per row, so the loss reads k
values per row rather than a dense ``[B, C]`` target. A ``fastkd.SparseTeacher`` holds the teacher
at temperature 1, so the target ``r`` (defined at ``T``) is given as the temperature-1
log-probabilities ``log_softmax(T log r)`` of its k classes: their uniform tail is then
``T log r_c + const`` on the other classes, and ``softmax(d / T) = r`` exactly. At ``T = 1`` this is
``SparseTeacher.from_logits(teacher_logits, k)``. The values are float64: at ``T > 1`` the tail
mass they leave, ``(C - k) r_c^T / sum(r^T)``, may be far below float32's resolution of 1, and
``kd_loss`` reads it from them in float64.
"""

from __future__ import annotations

import math

import torch

from ..sparse import SparseTeacher


def partial_teacher_logits(
    teacher_logits: torch.Tensor, k: int, temperature: float
) -> torch.Tensor:
    """Logits ``T * log r`` of the top-``k`` partial-teacher target (see the module docstring).

    Args:
        teacher_logits: ``[..., C]`` float logits.
        k: probabilities kept per row, ``k >= 1``.
        temperature: ``T > 0``, the temperature of the KD loss the result is passed to.

    Returns:
        float32 ``[..., C]`` logits; entries whose target probability is exactly 0 are ``-inf``.
    """
    _check(teacher_logits, k, temperature)
    classes = teacher_logits.shape[-1]
    p = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    if k >= classes:
        return temperature * torch.log(p)
    top, idx = p.topk(k, dim=-1)
    rest = (1.0 - top.sum(-1, keepdim=True)).clamp_min(0.0) / (classes - k)
    r = rest.expand_as(p).scatter(-1, idx, top)
    return temperature * torch.log(r)


def partial_teacher(teacher_logits: torch.Tensor, k: int, temperature: float) -> SparseTeacher:
    """The top-``k`` partial-teacher target as a ``fastkd.SparseTeacher`` for ``fastkd.kd_loss``
    at the same `temperature`: ``softmax(d / T) = r`` for the dense ``d`` it stands for (see the
    module docstring). ``k >= C``: every class, tail none (the full teacher).

    Returns:
        int64 ids ``[..., min(k, C)]`` and float64 temperature-1 log-probabilities, tail
        ``"uniform"``.
    """
    _check(teacher_logits, k, temperature)
    classes = teacher_logits.shape[-1]
    T = float(temperature)
    log_p = torch.log_softmax(teacher_logits.detach().double() / T, dim=-1)
    top, ids = log_p.topk(min(k, classes), dim=-1)
    z = T * top  # T log r on the kept classes (r = p there)
    if k >= classes:
        return SparseTeacher(ids, z, kind="logits", tail="none")
    # Spread mass of p outside the top k, and T log r_c of each class outside.
    rest = (-torch.expm1(torch.logsumexp(top, dim=-1, keepdim=True))).clamp_min(0.0)
    z_rest = T * torch.log(rest / (classes - k))
    log_z = torch.logaddexp(torch.logsumexp(z, dim=-1, keepdim=True),
                            z_rest + math.log(classes - k))
    return SparseTeacher(ids, z - log_z, kind="log_probs", tail="uniform")


def _check(teacher_logits: torch.Tensor, k: int, temperature: float) -> None:
    if not isinstance(teacher_logits, torch.Tensor) or not teacher_logits.is_floating_point():
        raise TypeError("teacher_logits must be a floating-point tensor")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
