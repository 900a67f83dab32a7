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
"""

from __future__ import annotations

import torch


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
    if not isinstance(teacher_logits, torch.Tensor) or not teacher_logits.is_floating_point():
        raise TypeError("teacher_logits must be a floating-point tensor")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    classes = teacher_logits.shape[-1]
    p = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    if k >= classes:
        return temperature * torch.log(p)
    top, idx = p.topk(k, dim=-1)
    rest = (1.0 - top.sum(-1, keepdim=True)).clamp_min(0.0) / (classes - k)
    r = rest.expand_as(p).scatter(-1, idx, top)
    return temperature * torch.log(r)
