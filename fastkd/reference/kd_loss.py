"""Plain-PyTorch KD loss: the test oracle (run in float64) and the ``"torch"`` backend.

Written straight from the definitions in ``fastkd.kd_loss``'s docstring and docs/methods.md
(#kd, #gkd, #dih), independently of the fused kernels' coefficient plan, so the two can check
each other. A sparse teacher (``fastkd.SparseTeacher``) is densified to the logit vector it stands
for and then treated as any dense teacher.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..sparse import SparseTeacher


def _max_and_log_sum_exp(x: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the maximum m (0 where it is not finite, so an all -inf row gives exp(-inf) = 0,
    not NaN) and log sum exp((x - m) / T)."""
    m = x.detach().amax(-1)
    m = torch.where(torch.isfinite(m), m, 0.0)
    return m, torch.logsumexp((x - m[:, None]) / temperature, dim=-1)


def kd_loss_ref(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTeacher | Sequence[torch.Tensor | SparseTeacher],
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float | None = None,
    label_smoothing: float = 0.0,
    guided: bool = False,
    ignore_index: int = -100,
    teacher_weights: Sequence[float] | None = None,
    reduction: str = "batchmean",
    divergence: str = "forward_kl",
    beta: float = 0.5,
) -> torch.Tensor:
    """Same arguments and result as :func:`fastkd.kd_loss` (computed in float32, or float64 for
    float64 inputs); differentiable through autograd. A `SparseTeacher` is densified (in that
    dtype) to the teacher it stands for; its ids must be distinct per row and in ``[0, C)`` (on
    the CPU a violation raises, elsewhere the loss is NaN)."""
    if isinstance(teacher_logits, (torch.Tensor, SparseTeacher)):
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
    invalid = torch.zeros((), dtype=torch.bool, device=s.device)
    for i, (t, w) in enumerate(zip(teachers, weights, strict=True)):
        if isinstance(t, SparseTeacher):
            name = "teacher_logits" if len(teachers) == 1 else f"teacher_logits[{i}]"
            t, bad = _densify(t, name, classes, acc)
            invalid = invalid | bad
        else:
            t = t.detach().reshape(-1, classes).to(acc)
        kept = counted if not guided else counted & (t.argmax(-1) == y)
        t = torch.where(kept[:, None], t, 0.0)  # as for s above
        m_t, log_zt = _max_and_log_sum_exp(t, T)
        p = torch.exp((t - m_t[:, None]) / T - log_zt[:, None])
        # KL(p || q) = sum_c p_c ((t_c - m_t) - (s_c - m_s)) / T + log z_s - log z_t: per-element
        # differences of logits taken relative to their row maxima, whose own terms
        # ((m_t - m_s) (sum_c p_c - 1) / T) vanish exactly, so float32 keeps the digits of a small
        # KL and of logits at large or different offsets. 0 * log 0 = 0: classes the teacher rules
        # out (p = 0, e.g. -inf logits) contribute nothing; tested as p == 0, not p > 0, so that a
        # NaN p still makes the row NaN.
        rel = (t - m_t[:, None]) - (s - m_s[:, None])
        if divergence == "forward_kl":
            div = torch.where(p == 0, 0.0, p * rel).sum(-1) / T + (log_zs - log_zt)
        else:
            div = _other_divergence(divergence, beta, p, rel, s, m_s, log_zs, log_zt, T)
        term = torch.where(kept, T * T * div, 0.0)
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

    result = per_row.view(lead) if reduction == "none" else total
    # Invalid ids of a sparse teacher on a GPU (the CPU raised): the loss is NaN, as for labels.
    return result + torch.where(invalid, torch.nan, 0.0)


def _other_divergence(
    divergence: str,
    beta: float,
    p: torch.Tensor,
    rel: torch.Tensor,
    s: torch.Tensor,
    m_s: torch.Tensor,
    log_zs: torch.Tensor,
    log_zt: torch.Tensor,
    T: float,
) -> torch.Tensor:
    """Per row, KL(q || p) (``"reverse_kl"``) or beta KL(p || m) + (1 - beta) KL(q || m)
    (``"jsd"``, m = beta p + (1 - beta) q), from the teacher's p, rel = (t - m_t) - (s - m_s) and
    the student's statistics. Terms whose weight (q, or p) is 0 contribute exactly 0, and the
    ``where``s take such entries out of the values they multiply too, so that the gradient of an
    unused inf or NaN is not 0 * inf = NaN."""
    log_q = (s - m_s[:, None]) / T - log_zs[:, None]
    q = torch.exp(log_q)
    if divergence == "reverse_kl":
        # KL(q || p) = sum_c q_c (-rel_c) / T + log z_t - log z_s (the maxima cancel as sum q = 1).
        neg_rel = torch.where(q == 0, 0.0, -rel)
        return (q * neg_rel).sum(-1) / T + (log_zt - log_zs)
    m = beta * p + (1.0 - beta) * q
    log_m = torch.log(torch.where(m > 0, m, 1.0))
    log_p = torch.where(p == 0, 0.0, torch.log(torch.where(p == 0, 1.0, p)))
    kl_pm = (p * torch.where(p == 0, 0.0, log_p - log_m)).sum(-1)
    kl_qm = (q * torch.where(q == 0, 0.0, log_q - log_m)).sum(-1)
    return beta * kl_pm + (1.0 - beta) * kl_qm


def _densify(
    teacher: SparseTeacher, name: str, classes: int, acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense teacher ``d`` a sparse teacher stands for, ``[rows, C]`` in `acc`, and whether
    its ids are invalid (a bool scalar). Ids must lie in ``[0, C)`` and be distinct per row: on the
    CPU a violation raises (a ValueError naming the row; under torch.compile a RuntimeError), on
    other devices, where raising would need a host sync, the flag makes the loss NaN."""
    _, values, tails = teacher._for_kernel(classes, acc)
    ids = teacher.indices.reshape(-1, teacher.k)
    in_range = (ids >= 0) & (ids < classes)
    ordered = ids.sort(-1).values
    repeated = ordered[:, 1:] == ordered[:, :-1]
    out_of_range_rows = ~in_range.all(-1)
    repeated_rows = repeated.any(-1)
    if ids.device.type == "cpu":
        _refuse(out_of_range_rows, lambda row: (
            f"{name}.indices must be class ids in [0, {classes})"
            + ("" if row is None else f"; row {row} holds {ids[row][~in_range[row]][0].item()}")
        ))
        _refuse(repeated_rows, lambda row: (
            f"{name}.indices must be distinct in each row"
            + ("" if row is None else
               f"; row {row} holds class {ordered[row, 1:][repeated[row]][0].item()} twice")
        ))
    d = tails[:, None].expand(-1, classes).clone()
    d.scatter_(-1, torch.where(in_range, ids, 0).long(), values)
    return d, (out_of_range_rows | repeated_rows).any()


def _refuse(bad_rows: torch.Tensor, message) -> None:
    """Raises when any of the (CPU) `bad_rows` is set: a ValueError with ``message(row)`` for the
    first bad row, or, while torch.compile traces (no data-dependent branch), a RuntimeError from
    ``torch._assert_async`` with ``message(None)``."""
    if torch.compiler.is_compiling():
        torch._assert_async(~bad_rows.any(), "fastkd: " + message(None))
    elif bad_rows.any():
        raise ValueError(message(int(bad_rows.nonzero()[0, 0])))
