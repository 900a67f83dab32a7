"""Triton kernels of ``fastkd::kd_loss_fwd_triton`` (same contract as csrc/kd_loss.h).

    q = softmax(s / T), p_k = softmax(t_k / T), w_k = kd_coef[k] * kd_row_weights[k, b]
    loss_b = T * sum_k w_k * KL(p_k || q) + v * CE(softmax(s), target),  v = ce_coef * ce_w[b]
    grad_b = sum_k w_k * (q - p_k) + v * (softmax(s) - target)
    KL(p_k || q) = sum_c p_kc (t_kc - s_c) / T + lse(s / T) - lse(t_k / T)

Shapes: student and teachers ``[outer, inner, C]`` (class stride 1; row ``b`` at
``(b // inner) * stride(0) + (b % inner) * stride(1)``), labels and row weights ``[rows]``.

One program per row, fp32 math. Sweep 1 runs an online log-sum-exp over ``BLOCK_C``-wide chunks of
the student and, for forward KL, of every dense teacher alongside it (each chunk of the student
is loaded once for all of them), relative to the running maximum in logit units (subtracted
before the 1/T scaling, so a large common offset costs no precision); sweep 2 writes the
gradient. The other divergences sweep each teacher after the student (they need the student's
final maximum). When ``C <= BLOCK_C`` a sweep is a single chunk and the re-read hits cache.
Weights of exactly 0 skip the teacher's loads and contribute exactly 0 (no 0 * inf).

Sparse (top-k) teachers (``NUM_S`` of them, after the ``NUM_T`` dense ones in the weights) stand
for the dense logits ``d`` with ``d[ids] = values`` and ``d = tail`` elsewhere (csrc/kd_loss.h).
Their terms come from the k entries, read in ``BLOCK_K``-wide chunks, the tail and the student's
statistics (``m_s``, ``log z_q`` and ``sum_c (s_c - m_s)``, the last kept only when
``NUM_S > 0``), relative to both maxima as in the CUDA kernel's ``sparse_teacher_loss``:

    m = max(max_i v_i, tail), e = exp((d - m) / T), Z = sum_i e_i + (C - k) e_tail
    KL = [sum_i e_i ((v_i - m) - (s[id_i] - m_s))
          + e_tail ((C - k) (tail - m) - (sum_c (s_c - m_s) - sum_i (s[id_i] - m_s)))] / (T Z)
         + log z_q - log Z
    grad: w (q - p_tail) on every class (a per-row constant of sweep 2), then w (p_tail - p_i)
          added at each id after the row's stores (a barrier before each teacher's fix-up: its
          ids may have been stored by other threads, and two teachers' ids may overlap). A
          float32 gradient takes it as a read-modify-write of the stored entry; a bf16/fp16 one
          would be rounded twice that way, so the entry's float32 value is recomputed (the
          sweep's operations) and the stored entry only contributes what earlier sparse teachers
          added there.

An id outside ``[0, C)`` raises on CPU tensors (the interpreter, like the C++ op); in a compiled
kernel it makes the row's loss NaN and drops that entry's correction (no host sync).

Divergences (``DIVERGENCE``, a constexpr: forward KL compiles as above, the others add their own
code): the term of teacher k is ``T w_k D_k`` and its gradient ``w_k dD_k/dz`` (z = s / T), with
``lq = log q``, ``lp = log p``, ``e_s = exp((s - m_s) / T)``, ``z_q = sum e_s``:

* 0, forward KL: ``D = KL(p || q)``, ``dD/dz = q - p`` (above).
* 1, reverse KL: ``D = KL(q || p) = X / T + log z_t - log z_q`` with
  ``X = sum_c e_s_c ((s_c - m_s) - (t_c - m_t)) / z_q``, summed during the teacher's
  log-sum-exp sweep (e_s is final there; a new teacher maximum shifts the earlier chunks' terms
  by ``(m_new - m_old) sum e_s``), no sweep of its own. ``dD/dz = q (diff - X) / T`` (diff the
  bracket), so the gradient sweep takes ``(q / T) (W (s - m_s) - sum_k w_k (t_k - m_k) - c_row)``,
  ``W = sum_k w_k``, ``c_row = sum_k w_k X_k``. A sparse teacher's ``X`` is
  ``[A - sum_i e_s[id_i] (v_i - m) - (tail - m) (z_q - sum_i e_s[id_i])] / z_q`` with the student
  statistic ``A = sum_c e_s_c (s_c - m_s)`` (kept online in the student sweep); the gradient
  sweep treats every class as a tail class (``base = tail``, or ``m`` when k == C, in ``c_row``)
  and the fix-up adds ``(w / T) q_i (base - v_i)`` at each id. ``q = 0`` contributes exactly 0;
  ``p = 0`` where ``q > 0`` gives +inf (the divergence is infinite).
* 2, JSD(beta): ``m = beta p + (1 - beta) q``, ``lm = log m``,
  ``D = sum_c [beta p (lp - lm) + (1 - beta) q (lq - lm)]``, ``Y = KL(q || m)``,
  ``dD/dz = (1 - beta) q (lq - lm - Y)`` (``dD/dq = (1 - beta)(lq - lm)`` exactly, then the
  softmax Jacobian). D and Y need the teacher's final statistics: after each teacher's
  log-sum-exp sweep a sweep of its own sums them (one chunk and a cache hit when
  ``C <= BLOCK_C``); the gradient sweep takes ``(1 - beta) q (sum_k w_k (lq - lm_k) - c_row)``,
  ``c_row = sum_k w_k Y_k``. ``lq - lm`` and ``lp - lm`` come from ``r = lp - lq`` with one exp
  of ``-|r|`` and one log (_jsd_logs: no overflow however far apart p and q are). A sparse
  teacher counts every class with ``p = p_tail`` in those sweeps (``lq - log(beta p_tail +
  (1 - beta) q)``, one log, in the gradient's); a third pass over its k entries replaces the
  tail's terms of D and Y by the ids' own, and the fix-up adds ``w (1 - beta) q_i (lm_tail,i -
  lm_i)`` at each id. A term whose weight p or q is 0 contributes exactly 0 (so ``p_tail = 0``,
  tail ``-inf``, is fine). Chunks stop at 1024 classes (registers: _num_warps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .._C import max_teachers as MAX_TEACHERS  # csrc/kd_loss.h: kMaxTeachers
from ._common import MAXNREG, pick

MAX_TEACHERS_C = tl.constexpr(MAX_TEACHERS)


@triton.jit
def _finite_or_zero(m):
    """A row maximum to subtract, as in the C++ kernel: 0 for a row with no finite maximum (all
    -inf so far, or +inf), so that exp(x - m) never meets -inf - (-inf) = NaN."""
    return tl.where((m > float("-inf")) & (m < float("inf")), m, 0.0)


@triton.jit
def _rescaled(z, m_old, m_new, inv_t):
    """A sum of exp((x - m_old) / T) moved to m_new; 0 while nothing finite has been summed."""
    return tl.where(z == 0.0, 0.0, z * tl.exp((m_old - m_new) * inv_t))


@triton.jit
def _row_ptr(base, row, inner, stride_outer, stride_inner):
    return base + (row // inner) * stride_outer + (row % inner) * stride_inner


@triton.jit
def _teacher_row(
    k: tl.constexpr, row, inner,
    t0, t1, t2, t3, t4, t5, t6, t7,
    so0, so1, so2, so3, so4, so5, so6, so7,
    si0, si1, si2, si3, si4, si5, si6, si7,
):
    """Dense teacher k's row (k known at compile time: one pointer argument per teacher)."""
    return _row_ptr(
        pick(k, t0, t1, t2, t3, t4, t5, t6, t7), row, inner,
        pick(k, so0, so1, so2, so3, so4, so5, so6, so7),
        pick(k, si0, si1, si2, si3, si4, si5, si6, si7),
    )


@triton.jit
def _teachers_chunk(
    xs, offs, mask, row, inner,
    t0, t1, t2, t3, t4, t5, t6, t7,
    so0, so1, so2, so3, so4, so5, so6, so7,
    si0, si1, si2, si3, si4, si5, si6, si7,
    w, kidx, inv_t, m_raw, m_t, z_t, cross,
    NUM_T: tl.constexpr, BLOCK: tl.constexpr,
):
    """One chunk of every dense teacher's online log-sum-exp and cross term (forward KL), with
    the student's chunk `xs` already loaded: the teachers' running maxima (raw and as
    subtracted), sums and cross terms side by side in [MAX_TEACHERS] vectors. A teacher of
    weight 0 loads nothing (its lanes masked off) and keeps zero sums."""
    m_new = m_t
    z_c = tl.zeros_like(z_t)
    cross_c = tl.zeros_like(cross)
    for k in tl.static_range(NUM_T):
        wk = tl.sum(tl.where(kidx == k, w, 0.0), 0)
        t_row = _teacher_row(
            k, row, inner, t0, t1, t2, t3, t4, t5, t6, t7,
            so0, so1, so2, so3, so4, so5, so6, so7, si0, si1, si2, si3, si4, si5, si6, si7,
        )
        live = mask & (tl.broadcast_to(wk, [BLOCK]) != 0.0)
        x = tl.load(t_row + offs, mask=live, other=float("-inf")).to(tl.float32)
        mr_k = tl.maximum(tl.sum(tl.where(kidx == k, m_raw, 0.0), 0), tl.max(x, 0))
        mn_k = _finite_or_zero(mr_k)
        e = tl.exp((x - mn_k) * inv_t)
        m_raw = tl.where(kidx == k, mr_k, m_raw)
        m_new = tl.where(kidx == k, mn_k, m_new)
        z_c = tl.where(kidx == k, tl.sum(e, 0), z_c)
        cross_c = tl.where(kidx == k, tl.sum(tl.where(e > 0.0, e * (x - xs), 0.0), 0), cross_c)
    z_t = _rescaled(z_t, m_t, m_new, inv_t) + z_c
    cross = _rescaled(cross, m_t, m_new, inv_t) + cross_c
    return m_raw, m_new, z_t, cross


@triton.jit
def _kd_loss_fwd_kernel(
    s_ptr, s_so, s_si,
    t0, t1, t2, t3, t4, t5, t6, t7,
    so0, so1, so2, so3, so4, so5, so6, so7,
    si0, si1, si2, si3, si4, si5, si6, si7,
    c0, c1, c2, c3, c4, c5, c6, c7,
    kd_rw_ptr, kd_rw_stride,
    labels_ptr, ce_rw_ptr, ce_coef,
    row_loss_ptr, grad_ptr,
    C, inner, temperature, label_smoothing,
    i0, i1, i2, i3, i4, i5, i6, i7,
    v0, v1, v2, v3, v4, v5, v6, v7,
    l0, l1, l2, l3, l4, l5, l6, l7,
    k0, k1, k2, k3, k4, k5, k6, k7,
    beta,
    NUM_T: tl.constexpr,
    NUM_S: tl.constexpr,
    HAS_KD_RW: tl.constexpr,
    HAS_CE: tl.constexpr,
    HAS_CE_RW: tl.constexpr,
    UNIT_T: tl.constexpr,
    SMOOTH: tl.constexpr,
    HAS_GRAD: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DIVERGENCE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    kidx = tl.arange(0, MAX_TEACHERS_C)
    inv_t = 1.0 / temperature
    s_row = _row_ptr(s_ptr, row, inner, s_so, s_si)

    # Per-teacher weights w_k as a small register vector.
    w = tl.zeros([MAX_TEACHERS_C], dtype=tl.float32)
    for k in tl.static_range(NUM_T):
        wk = pick(k, c0, c1, c2, c3, c4, c5, c6, c7)
        if HAS_KD_RW:
            wk = wk * tl.load(kd_rw_ptr + k * kd_rw_stride + row)
        w = tl.where(kidx == k, wk, w)
    for j in tl.static_range(NUM_S):
        wk = pick(NUM_T + j, c0, c1, c2, c3, c4, c5, c6, c7)
        if HAS_KD_RW:
            wk = wk * tl.load(kd_rw_ptr + (NUM_T + j) * kd_rw_stride + row)
        w = tl.where(kidx == NUM_T + j, wk, w)
    v = 0.0
    y = 0
    if HAS_CE:
        v = ce_coef
        if HAS_CE_RW:
            v = v * tl.load(ce_rw_ptr + row)
        y = tl.load(labels_ptr + row)

    # Student statistics, relative to the row's maximum m_s in logit units: z_q = sum exp((s - m_s)
    # / T), z_1 = sum exp(s - m_s) (CE at T != 1), the sum of s (label smoothing). Subtracting the
    # maximum before scaling keeps float32's relative precision for logits with a large common
    # offset (scaling first would round s / T to the offset's ulp).
    m_s = 0.0  # _finite_or_zero of the maximum so far
    z_q = 0.0
    z_1 = 0.0
    sum_s = 0.0
    s_rel = 0.0  # sum (s - m_s), moved along with m_s (sparse teachers' tail term)
    a_s = 0.0  # sum exp((s - m_s) / T) (s - m_s), moved along with m_s (reverse KL, sparse)
    m_raw = float("-inf")
    if DIVERGENCE == 0:
        # Forward KL: the dense teachers' statistics need only their own maxima, so they ride
        # along with the student's sweep (one read of each; see _teachers_chunk).
        t_mraw = tl.full([MAX_TEACHERS_C], float("-inf"), tl.float32)
        t_m = tl.zeros([MAX_TEACHERS_C], dtype=tl.float32)
        t_z = tl.zeros([MAX_TEACHERS_C], dtype=tl.float32)
        t_cross = tl.zeros([MAX_TEACHERS_C], dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        mask = start + cols < C
        x = tl.load(s_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if DIVERGENCE == 0:
            t_mraw, t_m, t_z, t_cross = _teachers_chunk(
                x, start + cols, mask, row, inner,
                t0, t1, t2, t3, t4, t5, t6, t7,
                so0, so1, so2, so3, so4, so5, so6, so7,
                si0, si1, si2, si3, si4, si5, si6, si7,
                w, kidx, inv_t, t_mraw, t_m, t_z, t_cross, NUM_T, BLOCK_C,
            )
        m_raw = tl.maximum(m_raw, tl.max(x, 0))
        m_new = _finite_or_zero(m_raw)
        if DIVERGENCE == 1:
            if NUM_S > 0:
                # e (x - m) summed so far, moved to m_new: e scales as z_q, x - m shifts by
                # m_s - m_new on every class summed so far (z_q of them, weighted).
                e = tl.exp((x - m_new) * inv_t)
                a_s = _rescaled(a_s + (m_s - m_new) * z_q, m_s, m_new, inv_t) + tl.sum(
                    tl.where(e > 0.0, e * (x - m_new), 0.0), 0
                )
        z_q = _rescaled(z_q, m_s, m_new, inv_t) + tl.sum(tl.exp((x - m_new) * inv_t), 0)
        if HAS_CE:
            if not UNIT_T:
                z_1 = _rescaled(z_1, m_s, m_new, 1.0) + tl.sum(tl.exp(x - m_new), 0)
            if SMOOTH:
                sum_s += tl.sum(tl.where(mask, x, 0.0), 0)
        if NUM_S > 0:
            if DIVERGENCE == 0:
                # The start classes summed so far move from m_s to m_new (0 when m_s is
                # unchanged).
                s_rel = s_rel + (m_s - m_new) * start + tl.sum(
                    tl.where(mask, x - m_new, 0.0), 0
                )
        m_s = m_new
    log_zq = tl.log(z_q)
    log_z1 = log_zq
    if HAS_CE:
        if not UNIT_T:
            log_z1 = tl.log(z_1)

    # Teachers: online log-sum-exp of t/T (relative to the maximum m_t, as for the student) and
    # the cross term sum_c p_c (t_c - s_c), divided by T at the end.
    loss = 0.0
    # The gradient sweep's per-row constant: sum_j w_j p_tail_j over the sparse teachers (forward
    # KL), sum_k w_k X_k plus the sparse teachers' tail terms (reverse KL), sum_k w_k Y_k (JSD).
    c_row = 0.0
    m_ts = tl.zeros([MAX_TEACHERS_C], dtype=tl.float32)
    log_zts = tl.zeros([MAX_TEACHERS_C], dtype=tl.float32)
    for k in tl.static_range(NUM_T):
        wk = tl.sum(tl.where(kidx == k, w, 0.0), 0)
        if wk != 0.0:
            t_row = _teacher_row(
                k, row, inner, t0, t1, t2, t3, t4, t5, t6, t7,
                so0, so1, so2, so3, so4, so5, so6, so7, si0, si1, si2, si3, si4, si5, si6, si7,
            )
            if DIVERGENCE == 0:
                m_t = tl.sum(tl.where(kidx == k, t_m, 0.0), 0)
                z_t = tl.sum(tl.where(kidx == k, t_z, 0.0), 0)
                cross = tl.sum(tl.where(kidx == k, t_cross, 0.0), 0)
            else:
                m_t = 0.0
                m_raw = float("-inf")
                z_t = 0.0
                cross = 0.0
                e_s_sum = 0.0  # reverse KL: sum of the student's e_s over the chunks so far
                for start in range(0, C, BLOCK_C):
                    mask = start + cols < C
                    x = tl.load(t_row + start + cols, mask=mask, other=float("-inf")).to(
                        tl.float32
                    )
                    if DIVERGENCE == 1:
                        xs = tl.load(s_row + start + cols, mask=mask, other=float("-inf")).to(
                            tl.float32
                        )
                    m_raw = tl.maximum(m_raw, tl.max(x, 0))
                    m_new = _finite_or_zero(m_raw)
                    e = tl.exp((x - m_new) * inv_t)
                    if DIVERGENCE == 1:
                        # sum_c e_s_c ((s_c - m_s) - (t_c - m_t)): e_s is final (m_s is), the
                        # teacher's maximum moves the earlier chunks' terms by m_new - m_t each.
                        e_s = tl.exp((xs - m_s) * inv_t)
                        cross = cross + (m_new - m_t) * e_s_sum + tl.sum(
                            tl.where(e_s > 0.0, e_s * ((xs - m_s) - (x - m_new)), 0.0), 0
                        )
                        e_s_sum += tl.sum(e_s, 0)
                    z_t = _rescaled(z_t, m_t, m_new, inv_t) + tl.sum(e, 0)
                    m_t = m_new
            log_zt = tl.log(z_t)
            if DIVERGENCE == 0:
                # lse(s / T) - lse(t / T), its large parts (the maxima) cancelled first.
                lse_diff = (m_s - m_t) * inv_t + (log_zq - log_zt)
                loss += wk * temperature * (cross * inv_t / z_t + lse_diff)
            elif DIVERGENCE == 1:
                # KL(q || p) = X / T + log z_t - log z_q with X = cross / z_q (the maxima's
                # terms cancel as sum q = 1); X joins the gradient's row constant.
                x_k = cross / z_q
                loss += wk * temperature * (x_k * inv_t + (log_zt - log_zq))
                c_row += wk * x_k
            else:
                # JSD: D and Y = KL(q || m) need the final m_t and log z_t: a sweep of their
                # own (one chunk and a cache hit when C <= BLOCK_C), one teacher at a time (all
                # at once kept every teacher's statistics in registers, and ptxas spilled).
                d_k, y_k = _jsd_row_sums(
                    s_row, t_row, C, m_s, log_zq, m_t, log_zt, 0.0, 0.0, inv_t, beta, cols,
                    True, BLOCK_C,
                )
                loss += wk * temperature * (beta * d_k + (1.0 - beta) * y_k)
                c_row += wk * y_k
            m_ts = tl.where(kidx == k, m_t, m_ts)
            log_zts = tl.where(kidx == k, log_zt, log_zts)

    # Sparse teachers: two passes over the k entries (their maximum, then the sums relative to
    # it), the student gathered at the ids (JSD: a third, the ids' corrections). Per teacher, m,
    # 1 / Z and p_tail are kept for the fix-up after the gradient sweep, and sum_j w_j p_tail_j
    # (forward KL) joins the sweep's row constant.
    bad_id = 0
    # m, 1 / Z, p_tail and, for reverse KL, the tail's logit base (tail, or m when k == C)
    # of sparse teacher j at j, 8 + j, 16 + j and 24 + j of one vector (32 wide, a power of
    # two): live across the gradient sweep in one register per thread. Three 8-wide vectors took
    # three, and ptxas spilled 8 bytes (sm_90; 6 dense and 2 sparse teachers, CE, smoothing, row
    # weights, C = 32000).
    sidx = tl.arange(0, 4 * MAX_TEACHERS_C)
    sp_stats = tl.zeros([4 * MAX_TEACHERS_C], dtype=tl.float32)
    kcols = tl.arange(0, BLOCK_K)
    for j in tl.static_range(NUM_S):
        wk = tl.sum(tl.where(kidx == NUM_T + j, w, 0.0), 0)
        if wk != 0.0:
            kj = pick(j, k0, k1, k2, k3, k4, k5, k6, k7)
            ids_row = pick(j, i0, i1, i2, i3, i4, i5, i6, i7) + row * kj
            vals_row = pick(j, v0, v1, v2, v3, v4, v5, v6, v7) + row * kj
            tail = tl.load(pick(j, l0, l1, l2, l3, l4, l5, l6, l7) + row)
            n_tail = tl.cast(C - kj, tl.float32)
            v_max = float("-inf")
            n_bad = 0
            for start in range(0, kj, BLOCK_K):
                kmask = start + kcols < kj
                vals = tl.load(vals_row + start + kcols, mask=kmask, other=float("-inf"))
                ids = tl.load(ids_row + start + kcols, mask=kmask, other=0)
                v_max = tl.maximum(v_max, tl.max(vals, 0))
                n_bad += tl.sum(((ids < 0) | (ids >= C)).to(tl.int32), 0)
            bad_id += n_bad
            m_d = _finite_or_zero(tl.where(n_tail > 0.0, tl.maximum(v_max, tail), v_max))
            z_ids = 0.0
            cross = 0.0
            at_ids = 0.0  # sum_i (s[id_i] - m_s)
            e_ids = 0.0  # reverse KL: sum_i e_s[id_i]
            for start in range(0, kj, BLOCK_K):
                kmask = start + kcols < kj
                vals = tl.load(vals_row + start + kcols, mask=kmask, other=float("-inf"))
                ids = tl.load(ids_row + start + kcols, mask=kmask, other=0)
                ok = kmask & (ids >= 0) & (ids < C)
                xs = tl.load(s_row + tl.where(ok, ids, 0), mask=ok, other=0.0).to(tl.float32)
                xs = tl.where(ok, xs - m_s, 0.0)
                dv = vals - m_d
                e = tl.exp(dv * inv_t)
                z_ids += tl.sum(e, 0)
                if DIVERGENCE == 0:
                    # p = 0 contributes 0 even where the difference is inf or NaN.
                    cross += tl.sum(tl.where(e > 0.0, e * ((dv - xs) * inv_t), 0.0), 0)
                    at_ids += tl.sum(xs, 0)
                elif DIVERGENCE == 1:
                    # The ids' part of sum_c e_s_c (d_c - m): q = 0 contributes 0.
                    e_s = tl.where(ok, tl.exp(xs * inv_t), 0.0)
                    e_ids += tl.sum(e_s, 0)
                    cross += tl.sum(tl.where(e_s > 0.0, e_s * dv, 0.0), 0)
            e_tail = tl.where(n_tail > 0.0, tl.exp((tail - m_d) * inv_t), 0.0)
            z_d = z_ids + n_tail * e_tail
            if DIVERGENCE == 0:
                # The C - k tail classes: their s_c - m_s sum to the row's minus the ids'. A
                # masked (-inf) student logit among the ids makes this NaN, as in the CUDA
                # kernel.
                rest = s_rel - at_ids
                cross += tl.where(
                    e_tail > 0.0, e_tail * ((n_tail * (tail - m_d) - rest) * inv_t), 0.0
                )
            inv_z = tl.math.div_rn(1.0, z_d)  # fp32 `/` is the approximate div.full.f32
            p_tail = e_tail * inv_z
            if DIVERGENCE == 0:
                loss += wk * temperature * (cross * inv_z + (log_zq - tl.log(z_d)))
                c_row += wk * p_tail
            elif DIVERGENCE == 1:
                # sum_c e_s_c ((s_c - m_s) - (d_c - m)) = A - sum_i e_s[id_i] (v_i - m)
                # - (tail - m) (z_q - sum_i e_s[id_i]); no tail term when k == C.
                rest = z_q - e_ids
                cross = a_s - cross - tl.where(
                    (n_tail > 0.0) & (rest != 0.0), (tail - m_d) * rest, 0.0
                )
                x_k = cross / z_q
                loss += wk * temperature * (x_k * inv_t + (tl.log(z_d) - log_zq))
                # The sweep takes every class as a tail class (base = tail; m when k == C);
                # the fix-up adds (w / T) q (base - v_i) at the ids.
                base = tl.where(n_tail > 0.0, tail, m_d)
                c_row += wk * (x_k + (base - m_d))
                sp_stats = tl.where(sidx == 3 * MAX_TEACHERS_C + j, base, sp_stats)
            else:
                # JSD: a sweep over the row counts every class with p = p_tail, then a third
                # pass over the k entries replaces that by the ids' own terms.
                lp_tail = tl.where(n_tail > 0.0, (tail - m_d) * inv_t - tl.log(z_d),
                                   float("-inf"))
                d_fix, y_fix = _jsd_row_sums(
                    s_row, s_row, C, m_s, log_zq, 0.0, 0.0, p_tail, lp_tail, inv_t, beta, cols,
                    False, BLOCK_C,
                )
                d_fix = beta * d_fix + (1.0 - beta) * y_fix
                for start in range(0, kj, BLOCK_K):
                    kmask = start + kcols < kj
                    vals = tl.load(vals_row + start + kcols, mask=kmask, other=float("-inf"))
                    ids = tl.load(ids_row + start + kcols, mask=kmask, other=0)
                    ok = kmask & (ids >= 0) & (ids < C)
                    xs = tl.load(s_row + tl.where(ok, ids, 0), mask=ok, other=float("-inf"))
                    lq = (xs.to(tl.float32) - m_s) * inv_t - log_zq
                    q = tl.exp(lq)
                    e = tl.exp((vals - m_d) * inv_t)
                    p = e * inv_z
                    lp = (vals - m_d) * inv_t - tl.log(z_d)
                    d_id, y_id = _jsd_terms(p, lp, q, lq, beta)
                    d_tl, y_tl = _jsd_terms(tl.broadcast_to(p_tail, [BLOCK_K]), lp_tail, q, lq,
                                            beta)
                    d_fix += tl.sum(tl.where(ok, d_id - d_tl, 0.0), 0)
                    y_fix += tl.sum(tl.where(ok, y_id - y_tl, 0.0), 0)
                loss += wk * temperature * d_fix
                c_row += wk * y_fix
            sp_stats = tl.where(sidx == j, m_d, sp_stats)
            sp_stats = tl.where(sidx == MAX_TEACHERS_C + j, inv_z, sp_stats)
            sp_stats = tl.where(sidx == 2 * MAX_TEACHERS_C + j, p_tail, sp_stats)

    eps = label_smoothing
    if HAS_CE:
        if v != 0.0:
            valid = (y >= 0) & (y < C)
            s_y = tl.load(s_row + tl.where(valid, y, 0)).to(tl.float32)
            # lse(s) - (1 - eps) s_y - eps / C sum_c s_c, with m_s taken out of the first two.
            ce = log_z1 + (1.0 - eps) * (m_s - s_y)
            # Only with smoothing: a masked (-inf) logit makes sum_s -inf, and 0 * -inf is NaN.
            if SMOOTH:
                ce += eps * (m_s - sum_s / C)
            # An out-of-range label cannot raise on the GPU without a host sync: it makes the
            # loss NaN, loudly, and its row's CE gradient is dropped.
            loss += tl.where(valid, v * ce, float("nan"))
            v = tl.where(valid, v, 0.0)
    if NUM_S > 0:
        # An id outside [0, C) cannot raise without a host sync: the row's loss is NaN.
        loss = tl.where(bad_id != 0, float("nan"), loss)
    tl.store(row_loss_ptr + row, loss)

    if HAS_GRAD:
        w_sum = tl.sum(w, 0)
        g_row = grad_ptr + row * C
        for start in range(0, C, BLOCK_C):
            offs = start + cols
            mask = offs < C
            g = _grad_at(
                offs, mask, s_row, row, inner,
                t0, t1, t2, t3, t4, t5, t6, t7,
                so0, so1, so2, so3, so4, so5, so6, so7,
                si0, si1, si2, si3, si4, si5, si6, si7,
                w, kidx, m_ts, log_zts, w_sum, c_row, m_s, log_zq, log_z1, inv_t, v, y, eps, C,
                sp_stats, sidx, beta, temperature, NUM_T, NUM_S, HAS_CE, BLOCK_C, DIVERGENCE,
            )
            tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
        # Sparse teachers' ids, one teacher at a time, after the row's stores: the id's own term
        # minus the tail's that the sweep wrote, added to each entry: w (p_tail - p_i) (forward
        # KL), (w / T) q (base - v_i) (reverse KL), w (1 - beta) q (lm_tail - lm_i) (JSD).
        # Branch-free like the dense teachers' terms: a teacher of weight 0 touches nothing
        # (every lane masked off).
        for j in tl.static_range(NUM_S):
            tl.debug_barrier()
            wk = tl.sum(tl.where(kidx == NUM_T + j, w, 0.0), 0)
            m_d = tl.sum(tl.where(sidx == j, sp_stats, 0.0), 0)
            inv_z = tl.sum(tl.where(sidx == MAX_TEACHERS_C + j, sp_stats, 0.0), 0)
            p_tail = tl.sum(tl.where(sidx == 2 * MAX_TEACHERS_C + j, sp_stats, 0.0), 0)
            kj = pick(j, k0, k1, k2, k3, k4, k5, k6, k7)
            ids_row = pick(j, i0, i1, i2, i3, i4, i5, i6, i7) + row * kj
            vals_row = pick(j, v0, v1, v2, v3, v4, v5, v6, v7) + row * kj
            for start in range(0, kj, BLOCK_K):
                live = (start + kcols < kj) & (tl.broadcast_to(wk, [BLOCK_K]) != 0.0)
                ids = tl.load(ids_row + start + kcols, mask=live, other=-1)
                ok = live & (ids >= 0) & (ids < C)
                ids = tl.where(ok, ids, 0)
                vals = tl.load(vals_row + start + kcols, mask=ok, other=float("-inf"))
                if DIVERGENCE == 0:
                    fix = wk * (p_tail - tl.exp((vals - m_d) * inv_t) * inv_z)
                else:
                    xs = tl.load(s_row + ids, mask=ok, other=float("-inf")).to(tl.float32)
                    lq = (xs - m_s) * inv_t - log_zq
                    q = tl.exp(lq)
                    if DIVERGENCE == 1:
                        base = tl.sum(tl.where(sidx == 3 * MAX_TEACHERS_C + j, sp_stats, 0.0), 0)
                        fix = tl.where(q > 0.0, (wk * inv_t) * q * (base - vals), 0.0)
                    else:
                        # lm_tail - lm_i = (lq - lm_i) - (lq - lm_tail), the latter as the
                        # sweep computed it.
                        lp = (vals - m_d) * inv_t + tl.log(inv_z)
                        u_id, _ = _jsd_logs(lp - lq, beta)
                        u_tail = lq - tl.log(beta * p_tail + (1.0 - beta) * q)
                        fix = tl.where(q > 0.0, (wk * (1.0 - beta)) * q * (u_id - u_tail), 0.0)
                if grad_ptr.dtype.element_ty == tl.float32:
                    old = tl.load(g_row + ids, mask=ok, other=0.0)
                else:
                    # A float32 read-modify-write of a bf16/fp16 entry would round it twice: the
                    # sweep's value, whose q - p cancels at the teacher's likely classes, is
                    # recomputed in float32 (the same operations, the same bits) and only what
                    # earlier teachers added there (0 at ids no other teacher has) is taken
                    # from the stored entry.
                    base = _grad_at(
                        ids, ok, s_row, row, inner,
                        t0, t1, t2, t3, t4, t5, t6, t7,
                        so0, so1, so2, so3, so4, so5, so6, so7,
                        si0, si1, si2, si3, si4, si5, si6, si7,
                        w, kidx, m_ts, log_zts, w_sum, c_row, m_s, log_zq, log_z1, inv_t, v, y,
                        eps, C, sp_stats, sidx, beta, temperature, NUM_T, NUM_S, HAS_CE, BLOCK_K,
                        DIVERGENCE,
                    )
                    if j > 0:
                        stored = tl.load(g_row + ids, mask=ok, other=0.0).to(tl.float32)
                        fix += stored - base.to(grad_ptr.dtype.element_ty).to(tl.float32)
                    old = base
                tl.store(g_row + ids, (old + fix).to(grad_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _grad_at(
    offs, mask, s_row, row, inner,
    t0, t1, t2, t3, t4, t5, t6, t7,
    so0, so1, so2, so3, so4, so5, so6, so7,
    si0, si1, si2, si3, si4, si5, si6, si7,
    w, kidx, m_ts, log_zts, w_sum, c_row, m_s, log_zq, log_z1, inv_t, v, y, eps, C,
    sp_stats, sidx, beta, temperature,
    NUM_T: tl.constexpr, NUM_S: tl.constexpr, HAS_CE: tl.constexpr, BLOCK: tl.constexpr,
    DIVERGENCE: tl.constexpr,
):
    """The row's gradient in float32 at the classes `offs` (lanes off `mask` unused), before
    the sparse teachers' corrections at their ids: the gradient sweep, and the fix-up that
    recomputes an entry."""
    x = tl.load(s_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
    if DIVERGENCE == 0:
        g = w_sum * tl.exp((x - m_s) * inv_t - log_zq)
        if NUM_S > 0:
            g -= c_row
    elif DIVERGENCE == 1:
        g = _other_kd_grad(
            x, offs, mask, row, inner,
            t0, t1, t2, t3, t4, t5, t6, t7,
            so0, so1, so2, so3, so4, so5, so6, so7,
            si0, si1, si2, si3, si4, si5, si6, si7,
            w, kidx, m_ts, log_zts, w_sum, c_row, m_s, log_zq, inv_t, sp_stats, sidx, beta,
            NUM_T, NUM_S, BLOCK, DIVERGENCE,
        )
    else:
        # JSD keeps lq = log q per class across the teachers instead of x (registers); CE's
        # exponent s - m_s is taken back from it.
        lq = (x - m_s) * inv_t - log_zq
        g = _other_kd_grad(
            lq, offs, mask, row, inner,
            t0, t1, t2, t3, t4, t5, t6, t7,
            so0, so1, so2, so3, so4, so5, so6, so7,
            si0, si1, si2, si3, si4, si5, si6, si7,
            w, kidx, m_ts, log_zts, w_sum, c_row, m_s, log_zq, inv_t, sp_stats, sidx, beta,
            NUM_T, NUM_S, BLOCK, DIVERGENCE,
        )
    if HAS_CE:
        if DIVERGENCE == 2:
            sm = tl.exp((lq + log_zq) * temperature - log_z1)
        else:
            sm = tl.exp(x - m_s - log_z1)
        target = eps / C + tl.where(offs == y, 1.0 - eps, 0.0)
        g += v * (sm - target)
    if DIVERGENCE == 0:
        for k in tl.static_range(NUM_T):
            # Branch-free: a teacher of weight 0 loads nothing (every lane masked off, so xt = -inf
            # and its term is exactly 0 * 0). A branch here kept one predicate per teacher alive
            # from sweep 1 to sweep 2, which ptxas spilled (sm_90, C = 1000).
            wk = tl.sum(tl.where(kidx == k, w, 0.0), 0)
            t_row = _teacher_row(
                k, row, inner, t0, t1, t2, t3, t4, t5, t6, t7,
                so0, so1, so2, so3, so4, so5, so6, so7, si0, si1, si2, si3, si4, si5, si6, si7,
            )
            m_t = tl.sum(tl.where(kidx == k, m_ts, 0.0), 0)
            log_zt = tl.sum(tl.where(kidx == k, log_zts, 0.0), 0)
            live = mask & (tl.broadcast_to(wk, [BLOCK]) != 0.0)
            xt = tl.load(t_row + offs, mask=live, other=float("-inf"))
            g -= wk * tl.exp((xt.to(tl.float32) - m_t) * inv_t - log_zt)
    # A row that counts nowhere gets exactly 0, even where its statistics are not finite.
    return tl.where((w_sum == 0.0) & (v == 0.0), 0.0, g)


@triton.jit
def _other_kd_grad(
    xl, offs, mask, row, inner,
    t0, t1, t2, t3, t4, t5, t6, t7,
    so0, so1, so2, so3, so4, so5, so6, so7,
    si0, si1, si2, si3, si4, si5, si6, si7,
    w, kidx, m_ts, log_zts, w_sum, c_row, m_s, log_zq, inv_t, sp_stats, sidx, beta,
    NUM_T: tl.constexpr, NUM_S: tl.constexpr, BLOCK: tl.constexpr, DIVERGENCE: tl.constexpr,
):
    """The teachers' gradient terms of reverse KL (DIVERGENCE 1) and JSD (2) at the classes
    `offs`, given the student's logits `xl` (reverse KL) or lq = log q (JSD) there, the sparse
    teachers' as if every class were a tail class:

        reverse KL: (q / T) (W (s - m_s) - sum_k w_k (t_k - m_k) - c_row),  W = sum_k w_k
        JSD:        (1 - beta) q (sum_k w_k (lq - lm_k) - c_row)

    with c_row the row constant of the kernel; q = 0 gives exactly 0."""
    if DIVERGENCE == 1:
        acc = w_sum * (xl - m_s)
        lq = (xl - m_s) * inv_t - log_zq
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        lq = xl
    for k in tl.static_range(NUM_T):
        # Branch-free as for forward KL: a teacher of weight 0 loads nothing.
        wk = tl.sum(tl.where(kidx == k, w, 0.0), 0)
        t_row = _teacher_row(
            k, row, inner, t0, t1, t2, t3, t4, t5, t6, t7,
            so0, so1, so2, so3, so4, so5, so6, so7, si0, si1, si2, si3, si4, si5, si6, si7,
        )
        m_t = tl.sum(tl.where(kidx == k, m_ts, 0.0), 0)
        live = mask & (tl.broadcast_to(wk, [BLOCK]) != 0.0)
        xt = tl.load(t_row + offs, mask=live, other=float("-inf")).to(tl.float32)
        if DIVERGENCE == 1:
            acc -= tl.where(live, wk * (xt - m_t), 0.0)
        else:
            # lq - lm from lp - lq: one exp and one log.
            log_zt = tl.sum(tl.where(kidx == k, log_zts, 0.0), 0)
            lp = (xt - m_t) * inv_t - log_zt
            u, _ = _jsd_logs(lp - lq, beta)
            acc += wk * u
    q = tl.exp(lq)
    if DIVERGENCE == 2:
        for j in tl.static_range(NUM_S):
            # A sparse teacher's tail: lq - log(beta p_tail + (1 - beta) q), one log (the
            # fix-up at its ids computes the same).
            wk = tl.sum(tl.where(kidx == NUM_T + j, w, 0.0), 0)
            p_tail = tl.sum(tl.where(sidx == 2 * MAX_TEACHERS_C + j, sp_stats, 0.0), 0)
            acc += wk * (lq - tl.log(beta * p_tail + (1.0 - beta) * q))
        return tl.where(q > 0.0, (1.0 - beta) * q * (acc - c_row), 0.0)
    else:
        return tl.where(q > 0.0, q * inv_t * (acc - c_row), 0.0)


@triton.jit
def _jsd_logs(r, beta):
    """lq - lm and lp - lm from r = lp - lq, m = beta p + (1 - beta) q, without overflow: with
    L = log(beta + (1 - beta) e^-r) for r >= 0, log(beta e^r + (1 - beta)) for r < 0 (one exp of
    -|r| and one log), lq - lm = -L - max(r, 0) and lp - lm = -L + min(r, 0). Finite wherever the
    term's weight (q, resp. p) is positive; NaN where both are 0 (a term the caller drops)."""
    e = tl.exp(-tl.abs(r))
    pos = r >= 0.0
    big = tl.log(tl.where(pos, beta + (1.0 - beta) * e, beta * e + (1.0 - beta)))
    return -big - tl.maximum(r, 0.0), -big + tl.minimum(r, 0.0)


@triton.jit
def _jsd_row_sums(
    s_row, t_row, C, m_s, log_zq, m_t, log_zt, p_const, lp_const, inv_t, beta, cols,
    DENSE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Over the row, sum_c p_c (lp_c - lm_c) and Y = sum_c q_c (lq_c - lm_c), m = beta p +
    (1 - beta) q: p from the teacher row (DENSE) or p_const (log p_const = lp_const) on every
    class (a sparse teacher's tail)."""
    d_vec = tl.zeros([BLOCK_C], dtype=tl.float32)
    y_vec = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        mask = start + cols < C
        xs = tl.load(s_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
        lq = (xs - m_s) * inv_t - log_zq
        q = tl.exp(lq)
        if DENSE:
            xt = tl.load(t_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            lp = (xt - m_t) * inv_t - log_zt
            p = tl.exp(lp)
        else:
            lp = tl.broadcast_to(lp_const, [BLOCK_C])
            p = tl.where(mask, p_const, 0.0)
        u_q, u_p = _jsd_logs(lp - lq, beta)
        # A term of weight 0 is exactly 0 (there lq - lm or lp - lm may be -inf or NaN).
        d_vec += tl.where(p > 0.0, p * u_p, 0.0)
        y_vec += tl.where(q > 0.0, q * u_q, 0.0)
    return tl.sum(d_vec, 0), tl.sum(y_vec, 0)


@triton.jit
def _jsd_terms(p, lp, q, lq, beta):
    """Per class, beta p (lp - lm) + (1 - beta) q (lq - lm) (the JSD's terms) and q (lq - lm)
    (those of KL(q || m)), m = beta p + (1 - beta) q; a term of weight p or q = 0 is exactly 0."""
    u, v = _jsd_logs(lp - lq, beta)
    yq = tl.where(q > 0.0, q * u, 0.0)
    d = tl.where(p > 0.0, beta * p * v, 0.0) + (1.0 - beta) * yq
    return d, yq


def _block_c(classes: int, divergence: int = 0) -> int:
    # Whole rows up to 4096 classes in one chunk; wider rows stream in 4096-wide chunks (16
    # warps: one program, one row, per SM, so that the rows in flight and their re-read distance
    # stay small; 2048-wide chunks at 8 warps would fit two rows per SM and double it). JSD: up
    # to 1024 (see _num_warps).
    return min(max(triton.next_power_of_2(classes), 16), 1024 if divergence == 2 else 4096)


def _num_warps(block_c: int, divergence: int = 0) -> int:
    """Warps per program: at most 8 elements of a chunk per thread from 1024 classes up.

    ptxas -v (tests/gpu_compile.py, sm_90 and sm_80; the heaviest case is 8 teachers, CE,
    smoothing, row weights, a bf16 student and C not a multiple of 16): 4 warps at every width
    took up to 112 registers at 1024, 168 at 2048 and 254 at 4096 (32 elements per thread), and
    spilled 4 bytes at 1024 with three teachers and CE on sm_90. With 8 warps at 1024 and 2048,
    16 at 4096 and the register budget of _common.MAXNREG no kernel spills and the largest takes
    126 registers (Triton 3.8; 122 with Triton 3.6); up to 512 classes 4 warps stay at or below
    100.

    JSD keeps more per class across the teachers in its gradient sweep (log q, the sum of the
    log-ratios and, with sparse teachers, q; forward KL one running value): with 8 teachers and 8
    elements per thread ptxas spilled 192 bytes (sm_90, C = 50257, 16 warps), with 4 up to 48
    bytes (sm_80 and sm_90, dense and sparse teachers, C = 1000 and 32000). Its chunks stop at
    1024 classes, with 8 warps at 512 and 16 at 1024: at most 2 elements per thread.
    """
    if divergence == 2:
        return 4 if block_c <= 256 else (8 if block_c == 512 else 16)
    if block_c <= 512:
        return 4
    return 8 if block_c <= 2048 else 16


def _check_labels_on_cpu(labels: torch.Tensor, classes: int, ignore_index: int) -> None:
    # On CPU tensors (the interpreter) the check is free and matches the C++ backend's error.
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= classes))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise RuntimeError(
            f"fastkd: labels must be in [0, {classes}) or equal ignore_index ({ignore_index}); "
            f"row {row} has label {int(labels[row])}"
        )


def _block_k(sparse_k: list[int]) -> int:
    # The widest teacher's k entries in one chunk up to 1024; more stream in 1024-wide chunks.
    return min(max(triton.next_power_of_2(max(sparse_k, default=1)), 16), 1024)


def _check_sparse(
    sparse_ids: list[torch.Tensor],
    sparse_values: list[torch.Tensor],
    sparse_tails: list[torch.Tensor],
    rows: int,
    classes: int,
    device: torch.device,
) -> None:
    """The layout the kernel reads (csrc/kd_loss_op.h checks the same for the C++ op)."""
    n = len(sparse_ids)
    if len(sparse_values) != n or len(sparse_tails) != n:
        raise ValueError(
            "fastkd: sparse_ids, sparse_values and sparse_tails must hold one tensor per sparse "
            f"teacher each, got {n}, {len(sparse_values)} and {len(sparse_tails)}"
        )
    lists = zip(sparse_ids, sparse_values, sparse_tails, strict=True)
    for j, (ids, vals, tails) in enumerate(lists):
        for name, t in (("sparse_ids", ids), ("sparse_values", vals), ("sparse_tails", tails)):
            if t.device != device:
                raise ValueError(f"fastkd: {name}[{j}] is on {t.device}, the student on {device}")
        if (ids.dtype != torch.int32 or ids.dim() != 2 or ids.shape[0] != rows
                or not 1 <= ids.shape[1] <= classes or not ids.is_contiguous()):
            raise ValueError(
                f"fastkd: sparse_ids[{j}] must be a contiguous int32 [{rows}, k] tensor with "
                f"1 <= k <= {classes}, got {ids.dtype} {tuple(ids.shape)}"
            )
        if vals.dtype != torch.float32 or vals.shape != ids.shape or not vals.is_contiguous():
            raise ValueError(
                f"fastkd: sparse_values[{j}] must be a contiguous float32 tensor of the shape of "
                f"sparse_ids[{j}] {tuple(ids.shape)}, got {vals.dtype} {tuple(vals.shape)}"
            )
        if tails.dtype != torch.float32 or tails.shape != (rows,) or not tails.is_contiguous():
            raise ValueError(
                f"fastkd: sparse_tails[{j}] must be a contiguous float32 vector of {rows} "
                f"entries, got {tails.dtype} {tuple(tails.shape)}"
            )


def _check_ids_on_cpu(sparse_ids: list[torch.Tensor], classes: int) -> None:
    # As the C++ op: an id outside [0, C) raises on CPU tensors (the interpreter).
    for j, ids in enumerate(sparse_ids):
        bad = (ids < 0) | (ids >= classes)
        if bool(bad.any()):
            row, i = (int(x) for x in bad.nonzero()[0])
            raise RuntimeError(
                f"fastkd: sparse_ids must be in [0, {classes}); sparse teacher {j} has id "
                f"{int(ids[row, i])} on row {row}"
            )


@triton_op("fastkd::kd_loss_fwd_triton", mutates_args=())
def kd_loss_fwd_triton(
    student: torch.Tensor,
    teachers: list[torch.Tensor],
    labels: torch.Tensor | None,
    kd_row_weights: torch.Tensor | None,
    ce_row_weights: torch.Tensor | None,
    kd_coefs: list[float],
    ce_coef: float,
    temperature: float,
    label_smoothing: float,
    ignore_index: int,
    per_row: bool,
    compute_grad: bool,
    sparse_ids: list[torch.Tensor],
    sparse_values: list[torch.Tensor],
    sparse_tails: list[torch.Tensor],
    divergence: int = 0,
    beta: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    outer, inner, classes = student.shape
    rows = outer * inner
    k = len(teachers)
    num_s = len(sparse_ids)
    if not 1 <= k + num_s <= MAX_TEACHERS:
        raise ValueError(
            f"fastkd: the Triton kernel takes 1 to {MAX_TEACHERS} teachers, got {k + num_s} "
            f"({k} dense, {num_s} sparse)"
        )
    if len(kd_coefs) != k + num_s:
        raise ValueError(
            f"fastkd: kd_coefs must hold one value per teacher ({k + num_s}: {k} dense, then "
            f"{num_s} sparse), got {len(kd_coefs)}"
        )
    _check_sparse(sparse_ids, sparse_values, sparse_tails, rows, classes, student.device)
    if divergence not in (0, 1, 2):
        raise ValueError(
            "fastkd: divergence must be 0 (forward KL), 1 (reverse KL) or 2 (JSD), got "
            f"{divergence}"
        )
    if divergence == 2 and not 0.0 < beta < 1.0:
        raise ValueError(f"fastkd: beta must be in (0, 1) for the JSD divergence, got {beta}")
    if student.device.type == "cpu":
        if labels is not None:
            _check_labels_on_cpu(labels, classes, ignore_index)
        _check_ids_on_cpu(sparse_ids, classes)
    row_loss = torch.empty(rows, device=student.device, dtype=torch.float32)
    if compute_grad:
        grad = torch.empty(student.shape, device=student.device, dtype=student.dtype)
    else:
        grad = torch.empty(0, device=student.device, dtype=student.dtype)
    # Unused slots hold a tensor the kernel never reads: the first dense teacher (the student
    # when there is none), the row losses for the sparse lists.
    pad = MAX_TEACHERS - k
    ts = list(teachers) + [teachers[0] if teachers else student] * pad
    so = [t.stride(0) for t in teachers] + [0] * pad
    si = [t.stride(1) for t in teachers] + [0] * pad
    coefs = [float(c) for c in kd_coefs] + [0.0] * (MAX_TEACHERS - k - num_s)
    pad_s = MAX_TEACHERS - num_s
    sk = [int(i.shape[1]) for i in sparse_ids]
    sparse_args = (
        list(sparse_ids) + [row_loss] * pad_s,
        list(sparse_values) + [row_loss] * pad_s,
        list(sparse_tails) + [row_loss] * pad_s,
        sk + [0] * pad_s,
    )
    has_ce = ce_coef != 0.0
    wrap_triton(_kd_loss_fwd_kernel)[(rows,)](
        student, student.stride(0), student.stride(1),
        *ts, *so, *si, *coefs,
        kd_row_weights if kd_row_weights is not None else row_loss,
        kd_row_weights.stride(0) if kd_row_weights is not None else 0,
        labels if has_ce else row_loss,
        ce_row_weights if ce_row_weights is not None else row_loss,
        float(ce_coef),
        row_loss, grad if compute_grad else row_loss,
        classes, inner, float(temperature), float(label_smoothing),
        *(a for group in sparse_args for a in group),
        float(beta),
        NUM_T=k,
        NUM_S=num_s,
        HAS_KD_RW=kd_row_weights is not None,
        HAS_CE=has_ce,
        HAS_CE_RW=ce_row_weights is not None,
        UNIT_T=temperature == 1.0,
        SMOOTH=has_ce and label_smoothing != 0.0,
        HAS_GRAD=compute_grad,
        BLOCK_C=_block_c(classes, divergence),
        BLOCK_K=_block_k(sk),
        DIVERGENCE=int(divergence),
        num_warps=_num_warps(_block_c(classes, divergence), divergence),
        maxnreg=MAXNREG,
    )
    loss = row_loss if per_row else row_loss.sum()
    return loss, grad
