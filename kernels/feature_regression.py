"""Triton kernels of ``fastkd::feature_regression_fwd_triton``; contract in
csrc/feature_regression.h.

Per pair ``i`` of student ``a`` and teacher ``b`` of one shape ``[B, ...]``, ``D`` elements per
sample, ``c = weight / (B * D)`` (mean) or ``weight`` (sum)::

    normalize=False:  loss = c * sum |a - b|^p,  grad = c * p * |d|^(p-1) sign(d),  d = a - b
    normalize=True:   u = a / max(||a||, eps), v = b / max(||b||, eps) per sample, d = u - v,
                      g = sign(d) (p=1) or d (p=2), loss = c * sum |d|^p,
                      grad = c * p * (g - u <u, g>) / ||a||  (||a|| >= eps)
                             c * p * g / eps                  (||a|| < eps: u = a / eps)

Shapes: every tensor is dense with each sample contiguous (NCHW or channels_last) and a pair shares
one layout, so pairs are flat arrays; the gradient has the student's strides.

One launch for all pairs (up to 8): the grid is the concatenation of every pair's programs, and
each program finds its pair by comparing its id with the pairs' first program (unrolled over the
compile-time pair count). Without normalisation a program owns ``ITEM`` consecutive elements,
reads them once, writes their gradient and its loss partial. With normalisation a program owns
one sample and sweeps it three times -- the norms, then (backwards, so it starts on the blocks the
first sweep read last, still in L2) the loss and ``<u, g>``, then the gradient -- because both
sums are needed before the next sweep can start. fp32 math; each program's loss partial lands in
its own slot and the slots are summed by one reduction, so results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from .._inputs import same_layout, sample_blocked
from ._common import MAXNREG, pick

MAX_PAIRS = 8
# Constants read inside @triton.jit functions must be tl.constexpr: compiled Triton rejects other
# globals (the interpreter accepts them).
EPS = tl.constexpr(1e-12)
_HALF_MAX = tl.constexpr(65504.0)
# Elements per program without normalisation: ITEM = _PLAIN_BLOCK * _PLAIN_BLOCKS.
_PLAIN_BLOCK = 2048
_PLAIN_BLOCKS = 4
_NORM_BLOCK = 4096


@triton.jit
def _err(d, P: tl.constexpr):
    if P == 2:
        return d * d
    else:
        return tl.abs(d)


@triton.jit
def _dir(d, P: tl.constexpr):
    """The loss's derivative direction: d for p=2, sign(d) for p=1 (sign(0) = 0)."""
    if P == 2:
        return d
    else:
        return tl.where(d > 0.0, 1.0, 0.0) - tl.where(d < 0.0, 1.0, 0.0)


@triton.jit
def _to_grad(x, g_ptr):
    # float16 saturates at +-65504 (the gradient of an all-zero sample under normalisation is about
    # c / eps); NaN stays NaN.
    if g_ptr.dtype.element_ty == tl.float16:
        x = tl.where(x > _HALF_MAX, _HALF_MAX, tl.where(x < -_HALF_MAX, -_HALF_MAX, x))
    return x.to(g_ptr.dtype.element_ty)


@triton.jit
def _plain_item(s_ptr, t_ptr, g_ptr, item, numel, scale, P: tl.constexpr, HAS_GRAD: tl.constexpr,
                BLOCK: tl.constexpr, BLOCKS: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    base = item.to(tl.int64) * (BLOCK * BLOCKS)
    gscale = scale * P
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(BLOCKS):
        offs = base + j * BLOCK + cols
        mask = offs < numel
        a = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = a - b
        acc += _err(d, P)
        if HAS_GRAD:
            tl.store(g_ptr + offs, _to_grad(_dir(d, P) * gscale, g_ptr), mask=mask)
    return tl.sum(acc, 0) * scale


@triton.jit
def _normalized_sample(s_ptr, t_ptr, g_ptr, sample, D, scale, P: tl.constexpr,
                       HAS_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    base = sample.to(tl.int64) * D
    s_row = s_ptr + base
    t_row = t_ptr + base

    sa = tl.zeros([BLOCK], dtype=tl.float32)
    sb = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, D, BLOCK):
        offs = start + cols
        mask = offs < D
        a = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
        sa += a * a
        sb += b * b
    na = tl.sqrt_rn(tl.sum(sa, 0))
    nb = tl.sqrt_rn(tl.sum(sb, 0))
    # Correctly rounded divisions (div_rn): fp32 `/` compiles to the approximate div.full.f32,
    # whose x / x need not be 1.
    ia = tl.math.div_rn(1.0, tl.maximum(na, EPS))
    # d = (a - r b) / ||a|| with r = ||a|| / ||b||, not a / ||a|| - b / ||b||: a fused
    # multiply-subtract in the latter would make d nonzero for equal samples (sign(d) = +-1 where
    # it must be 0); the former is exact there (r = 1, exactly, as the division is correctly
    # rounded), and for a student proportional to its teacher wherever r is exact.
    r = tl.math.div_rn(tl.maximum(na, EPS), tl.maximum(nb, EPS))

    blocks = tl.cdiv(D, BLOCK)
    lsum = tl.zeros([BLOCK], dtype=tl.float32)
    dsum = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, blocks):
        offs = (blocks - 1 - i) * BLOCK + cols
        mask = offs < D
        a = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
        u = a * ia
        e = (a - b * r) * ia
        lsum += _err(e, P)
        if HAS_GRAD:
            dsum += u * _dir(e, P)

    if HAS_GRAD:
        # Below eps the normalisation is the linear map a / eps: no projection.
        dot = tl.where(na >= EPS, tl.sum(dsum, 0), 0.0)
        k = scale * P * ia
        g_row = g_ptr + base
        for start in range(0, D, BLOCK):
            offs = start + cols
            mask = offs < D
            a = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
            u = a * ia
            e = (a - b * r) * ia
            tl.store(g_row + offs, _to_grad((_dir(e, P) - u * dot) * k, g_ptr), mask=mask)
    return tl.sum(lsum, 0) * scale


@triton.jit
def _feature_regression_fwd_kernel(
    s0, s1, s2, s3, s4, s5, s6, s7,
    t0, t1, t2, t3, t4, t5, t6, t7,
    g0, g1, g2, g3, g4, g5, g6, g7,
    n0, n1, n2, n3, n4, n5, n6, n7,
    f0, f1, f2, f3, f4, f5, f6, f7,
    e0, e1, e2, e3, e4, e5, e6, e7,
    c0, c1, c2, c3, c4, c5, c6, c7,
    partial_ptr,
    NUM_PAIRS: tl.constexpr,
    GRAD_MASK: tl.constexpr,
    P: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    # Pair k owns programs [f_k, e_k); n_k is its numel (plain) or sample length D (normalized).
    pid = tl.program_id(0)
    for k in tl.static_range(NUM_PAIRS):
        first = pick(k, f0, f1, f2, f3, f4, f5, f6, f7)
        end = pick(k, e0, e1, e2, e3, e4, e5, e6, e7)
        if (pid >= first) & (pid < end):
            s_ptr = pick(k, s0, s1, s2, s3, s4, s5, s6, s7)
            t_ptr = pick(k, t0, t1, t2, t3, t4, t5, t6, t7)
            g_ptr = pick(k, g0, g1, g2, g3, g4, g5, g6, g7)
            n = pick(k, n0, n1, n2, n3, n4, n5, n6, n7)
            scale = pick(k, c0, c1, c2, c3, c4, c5, c6, c7)
            if NORMALIZE:
                part = _normalized_sample(s_ptr, t_ptr, g_ptr, pid - first, n, scale, P,
                                          (GRAD_MASK >> k) & 1, BLOCK)
            else:
                part = _plain_item(s_ptr, t_ptr, g_ptr, pid - first, n, scale, P,
                                   (GRAD_MASK >> k) & 1, BLOCK, BLOCKS)
            tl.store(partial_ptr + pid, part)


def _block(n: int, cap: int) -> int:
    return min(max(triton.next_power_of_2(n), 16), cap)


@triton_op("fastkd::feature_regression_fwd_triton", mutates_args=())
def feature_regression_fwd_triton(
    students: list[torch.Tensor],
    teachers: list[torch.Tensor],
    weights: list[float],
    p: int,
    normalize: bool,
    mean: bool,
    compute_grad: list[bool],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    k = len(students)
    if not 1 <= k <= MAX_PAIRS:
        raise ValueError(f"fastkd: the Triton kernel takes 1 to {MAX_PAIRS} pairs, got {k}")
    if len(teachers) != k or len(weights) != k or len(compute_grad) != k:
        raise ValueError("fastkd: feature_regression needs one teacher, weight and flag per pair")
    if p not in (1, 2):
        raise ValueError(f"fastkd: feature_regression supports p = 1 or 2, got {p}")
    device = students[0].device
    sizes = []
    for i, (s, t) in enumerate(zip(students, teachers, strict=True)):
        if s.shape != t.shape or s.dim() < 2 or s.numel() == 0:
            raise ValueError(f"fastkd: pair {i} has shapes {tuple(s.shape)} and {tuple(t.shape)}")
        if s.dtype != students[0].dtype or t.dtype != teachers[0].dtype:
            raise ValueError("fastkd: all students must share one dtype and all teachers another")
        if s.device != device or t.device != device:
            raise ValueError("fastkd: all features must be on one device")
        if not (sample_blocked(s) and sample_blocked(t) and same_layout(s, t)):
            raise ValueError(
                f"fastkd: pair {i} must be dense with each sample contiguous, student and teacher "
                f"in one layout; got strides {s.stride()} and {t.stride()}"
            )
        sizes.append((s.shape[0], s.numel() // s.shape[0]))

    if normalize:
        block = _block(max(d for _, d in sizes), _NORM_BLOCK)
        blocks = 1
        counts = [b for b, _ in sizes]
        lens = [d for _, d in sizes]
    else:
        block = _block(max(b * d for b, d in sizes), _PLAIN_BLOCK)
        blocks = _PLAIN_BLOCKS
        counts = [triton.cdiv(b * d, block * blocks) for b, d in sizes]
        lens = [b * d for b, d in sizes]
    firsts = [sum(counts[:i]) for i in range(k)]
    ends = [f + c for f, c in zip(firsts, counts, strict=True)]
    programs = ends[-1]
    partials = torch.empty(programs, device=device, dtype=torch.float32)
    grads = [
        torch.empty_like(s) if g else s.new_empty((0,))
        for s, g in zip(students, compute_grad, strict=True)
    ]
    scales = [
        float(w) / (b * d) if mean else float(w)
        for w, (b, d) in zip(weights, sizes, strict=True)
    ]
    pad = MAX_PAIRS - k
    grad_ptrs = [g if flag else partials for g, flag in zip(grads, compute_grad, strict=True)]
    mask = sum(1 << i for i, flag in enumerate(compute_grad) if flag)
    wrap_triton(_feature_regression_fwd_kernel)[(programs,)](
        *students, *[students[0]] * pad,
        *teachers, *[teachers[0]] * pad,
        *grad_ptrs, *[partials] * pad,
        *lens, *[0] * pad,
        *firsts, *[0] * pad,
        *ends, *[0] * pad,
        *scales, *[0.0] * pad,
        partials,
        NUM_PAIRS=k,
        GRAD_MASK=mask,
        P=p,
        NORMALIZE=normalize,
        BLOCK=block,
        BLOCKS=blocks,
        # 8 elements of a block per thread where blocks are widest (ptxas -v, Triton 3.6/3.8:
        # 128 registers plain at 2048 with 4 warps, <= 96 normalized at 4096 with 8 warps).
        num_warps=8 if normalize or block >= 2048 else 4,
        maxnreg=MAXNREG,
    )
    loss = partials.sum()
    return loss, grads
