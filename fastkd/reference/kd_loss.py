"""Plain-PyTorch KD loss: the test oracle (run in float64) and the ``"torch"`` backend.

Written straight from the definitions in ``fastkd.kd_loss``'s docstring and docs/methods.md
(#kd, #gkd, #dih), independently of the fused kernels' coefficient plan, so the two can check
each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _max_and_log_sum_exp(x: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the maximum m (0 where it is not finite, so an all -inf row gives exp(-inf) = 0,
    not NaN) and log sum exp((x - m) / T)."""
    m = x.detach().amax(-1)
    m = torch.where(torch.isfinite(m), m, 0.0)
    return m, torch.logsumexp((x - m[:, None]) / temperature, dim=-1)


def kd_loss_ref(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float | None = None,
    label_smoothing: float = 0.0,
    guided: bool = False,
    ignore_index: int = -100,
    teacher_weights: Sequence[float] | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Same arguments and result as :func:`fastkd.kd_loss` (computed in float32, or float64 for
    float64 inputs); differentiable through autograd."""
    if isinstance(teacher_logits, torch.Tensor):
        teacher_logits = [teacher_logits]
    teachers = list(teacher_logits)
    weights = [1.0] * len(teachers) if teacher_weights is None else list(teacher_weights)
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    classes = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    s = student_logits.reshape(-1, classes).to(acc)
    rows = s.shape[0]
    T = float(temperature)
    y = None if labels is None else labels.reshape(-1).long()
    if y is None:
        counted = torch.ones(rows, dtype=torch.bool, device=s.device)
        valid = counted
    else:
        counted = y != ignore_index
        valid = ~counted | ((y >= 0) & (y < classes))
        if y.device.type == "cpu":
            # Like the C++ kernel: refuse such labels (a negative one would index from the end,
            # a large one would silently count as a miss). On a GPU that needs a host sync or a
            # device-side assert, so the affected rows turn the loss NaN instead, like the
            # GPU kernels.
            torch._assert_async(
                valid.all(),
                f"fastkd: labels must be in [0, {classes}) or equal ignore_index ({ignore_index})",
            )

    def reduce(per_row: torch.Tensor, kept: torch.Tensor, per_class: bool) -> torch.Tensor:
        if reduction == "sum":
            return per_row.sum()
        n = kept.sum().clamp_min(1).to(acc)
        if reduction == "mean" and per_class:
            n = n * classes
        return per_row.sum() / n

    # Rows that count nowhere are replaced by zeros before any softmax: their loss is dropped
    # anyway, and an all -inf (padding) or NaN row would otherwise send NaN into the gradient
    # through the backward of the `where` that drops it.
    s = torch.where(counted[:, None], s, 0.0)
    m_s, log_zs = _max_and_log_sum_exp(s, T)
    kd_weight = 1.0 if alpha is None else float(alpha)
    per_row = torch.zeros(rows, dtype=acc, device=s.device)
    total = torch.zeros((), dtype=acc, device=s.device)
    for t, w in zip(teachers, weights, strict=True):
        t = t.detach().reshape(-1, classes).to(acc)
        kept = counted if not guided else counted & (t.argmax(-1) == y)
        t = torch.where(kept[:, None], t, 0.0)  # as for s above
        m_t, log_zt = _max_and_log_sum_exp(t, T)
        p = torch.exp((t - m_t[:, None]) / T - log_zt[:, None])
        # KL(p || q) = sum_c p_c (t_c - s_c) / T + lse(s / T) - lse(t / T), as the kernels compute
        # it: per-element differences of the logits, and the log-sum-exps' large parts (the row
        # maxima) cancelled before they meet, so float32 keeps the digits of a small KL and of
        # logits with a large common offset. 0 * log 0 = 0: classes the teacher rules out (p = 0,
        # e.g. -inf logits) contribute nothing; tested as p == 0, not p > 0, so that a NaN p still
        # makes the row NaN.
        cross = torch.where(p == 0, 0.0, p * (t - s)).sum(-1) / T
        kl = cross + (m_s - m_t) / T + (log_zs - log_zt)
        term = torch.where(kept, T * T * kl, 0.0)
        per_row = per_row + kd_weight * w * term
        total = total + kd_weight * w * reduce(term, kept, per_class=True)

    if alpha is not None:
        eps = float(label_smoothing)
        log_sm = F.log_softmax(s, dim=-1)
        target = torch.full_like(s, eps / classes)
        hot = torch.where(counted & valid, y, 0)
        target[torch.arange(rows, device=s.device), hot] += 1.0 - eps
        ce = -torch.where(target > 0, target * log_sm, 0.0).sum(-1)
        ce = torch.where(counted, torch.where(valid, ce, torch.nan), 0.0)
        per_row = per_row + (1.0 - alpha) * ce
        total = total + (1.0 - alpha) * reduce(ce, counted, per_class=False)

    if reduction == "none":
        return per_row.view(lead)
    return total
