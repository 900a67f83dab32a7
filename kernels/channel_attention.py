"""Triton kernels of ``fastkd::channel_attention_fwd_triton`` / ``_bwd_triton`` (same contract as
csrc/channel_attention.h).

For pair ``i`` with student ``S [B, C, Hs, Ws]`` and teacher ``T [B, C, Ht, Wt]``::

    d[b, c] = mean_{h, w} S[b, c, h, w] - mean_{h, w} T[b, c, h, w]
    loss = sum_i coef_i * sum_{b, c} d[b, c]^2        (coef_i = weight_i / (B C) for "mean")
    diff[b, c] = 2 coef_i d[b, c] / (Hs Ws)          (dloss/dS[b, c, h, w], the same at every h, w)

Forward: one program per (pair, b, block of ``BLOCK_C`` channels) sweeps both maps in
``[BLOCK_C, BLOCK_P]`` tiles addressed as ``b * stride_b + c * stride_c + p * pixel_stride``
(pixel ``p = h * W + w``), accumulating element-wise in float32 and reducing over pixels once at
the end. That one addressing covers contiguous NCHW (pixel stride 1) and channels_last (channel
stride 1); Triton specialises the stride that equals 1 and vectorises loads along that axis, so
each format is read in its own memory order without a copy. Maps whose pixels are not evenly
spaced (a crop in H or W) are copied to contiguous first. Each program writes its block of
``diff`` and its share of the loss; the shares are summed by ``torch.sum`` (a fixed-order
reduction), so the loss is deterministic.

Backward: one program per (pair, b, channel block, pixel block) broadcasts
``grad_output * diff`` into the dense gradient (NCHW or channels_last, as the student).

Grouping: every pair of a call runs in one launch per direction, up to ``MAX_PAIRS`` pairs per
launch. Triton kernels take no arrays of pointers, so each pair's pointers, strides and sizes are
explicit arguments selected by compile-time pair index (as the KD kernel does for teachers); four
pairs -- the four stages of a ResNet -- keep that list at 63 arguments. Longer lists take one
launch per four pairs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import MAXNREG, pick4

MAX_PAIRS = 4
_BLOCK_C = 32
_BLOCK_P = 64


@triton.jit
def _channel_means(ptr, b, cs, cmask, sb, sc, sp, hw, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    rows = ptr + b * sb + cs.to(tl.int64)[:, None] * sc
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for p0 in range(0, hw, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = cmask[:, None] & (ps < hw)[None, :]
        x = tl.load(rows + ps.to(tl.int64)[None, :] * sp, mask=mask, other=0.0)
        acc += x.to(tl.float32)
    return tl.sum(acc, 1) / hw


@triton.jit
def _fwd_pair(
    local, pid, s_ptr, t_ptr, ssb, ssc, ssp, tsb, tsc, tsp, C, hw_s, hw_t, coef, gscale, doff,
    diff_ptr, partial_ptr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    local = local.to(tl.int64)
    nblk = tl.cdiv(C, BLOCK_C)
    b = local // nblk
    cs = (local % nblk) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    w_s = _channel_means(s_ptr, b, cs, cmask, ssb, ssc, ssp, hw_s, BLOCK_C, BLOCK_P)
    w_t = _channel_means(t_ptr, b, cs, cmask, tsb, tsc, tsp, hw_t, BLOCK_C, BLOCK_P)
    d = w_s - w_t  # exactly 0 on masked channels
    tl.store(diff_ptr + doff + b * C + cs, d * gscale, mask=cmask)
    tl.store(partial_ptr + pid, coef * tl.sum(d * d, 0))


@triton.jit
def _channel_attention_fwd_kernel(
    s0, s1, s2, s3, t0, t1, t2, t3,
    ssb0, ssb1, ssb2, ssb3, ssc0, ssc1, ssc2, ssc3, ssp0, ssp1, ssp2, ssp3,
    tsb0, tsb1, tsb2, tsb3, tsc0, tsc1, tsc2, tsc3, tsp0, tsp1, tsp2, tsp3,
    C0, C1, C2, C3, hs0, hs1, hs2, hs3, ht0, ht1, ht2, ht3,
    coef0, coef1, coef2, coef3, gs0, gs1, gs2, gs3, off0, off1, off2, off3,
    start0, start1, start2, start3, start4,
    diff_ptr, partial_ptr,
    NUM_PAIRS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    for k in tl.static_range(NUM_PAIRS):
        lo = pick4(k, start0, start1, start2, start3)
        hi = pick4(k, start1, start2, start3, start4)
        if (pid >= lo) & (pid < hi):
            _fwd_pair(
                pid - lo, pid,
                pick4(k, s0, s1, s2, s3), pick4(k, t0, t1, t2, t3),
                pick4(k, ssb0, ssb1, ssb2, ssb3), pick4(k, ssc0, ssc1, ssc2, ssc3),
                pick4(k, ssp0, ssp1, ssp2, ssp3),
                pick4(k, tsb0, tsb1, tsb2, tsb3), pick4(k, tsc0, tsc1, tsc2, tsc3),
                pick4(k, tsp0, tsp1, tsp2, tsp3),
                pick4(k, C0, C1, C2, C3), pick4(k, hs0, hs1, hs2, hs3),
                pick4(k, ht0, ht1, ht2, ht3), pick4(k, coef0, coef1, coef2, coef3),
                pick4(k, gs0, gs1, gs2, gs3), pick4(k, off0, off1, off2, off3),
                diff_ptr, partial_ptr, BLOCK_C, BLOCK_P,
            )


@triton.jit
def _bwd_pair(
    local, g_ptr, d_ptr, C, hw, sc, sp, go, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr
):
    local = local.to(tl.int64)
    n_p = tl.cdiv(hw, BLOCK_P)
    n_c = tl.cdiv(C, BLOCK_C)
    ps = (local % n_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    rest = local // n_p
    cs = (rest % n_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    b = rest // n_c
    cmask = cs < C
    v = tl.load(d_ptr + b * C + cs, mask=cmask, other=0.0) * go
    ptrs = g_ptr + b * C * hw + cs.to(tl.int64)[:, None] * sc + ps.to(tl.int64)[None, :] * sp
    mask = cmask[:, None] & (ps < hw)[None, :]
    val = tl.broadcast_to(v[:, None], [BLOCK_C, BLOCK_P]).to(g_ptr.dtype.element_ty)
    tl.store(ptrs, val, mask=mask)


@triton.jit
def _channel_attention_bwd_kernel(
    g0, g1, g2, g3, d0, d1, d2, d3,
    C0, C1, C2, C3, hw0, hw1, hw2, hw3,
    sc0, sc1, sc2, sc3, sp0, sp1, sp2, sp3,
    start0, start1, start2, start3, start4,
    go_ptr,
    NUM_PAIRS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    go = tl.load(go_ptr).to(tl.float32)
    for k in tl.static_range(NUM_PAIRS):
        lo = pick4(k, start0, start1, start2, start3)
        hi = pick4(k, start1, start2, start3, start4)
        if (pid >= lo) & (pid < hi):
            _bwd_pair(
                pid - lo,
                pick4(k, g0, g1, g2, g3), pick4(k, d0, d1, d2, d3),
                pick4(k, C0, C1, C2, C3), pick4(k, hw0, hw1, hw2, hw3),
                pick4(k, sc0, sc1, sc2, sc3), pick4(k, sp0, sp1, sp2, sp3),
                go, BLOCK_C, BLOCK_P,
            )


def _padded(values: list, fill, count: int = MAX_PAIRS) -> list:
    """`values` padded with `fill` to `count` entries: the unused pairs' arguments."""
    return list(values) + [fill] * (count - len(values))


def _evenly_spaced(x: torch.Tensor) -> torch.Tensor:
    """``x``, or a contiguous copy when its pixels are not evenly spaced in memory."""
    h, w = x.shape[2], x.shape[3]
    if h == 1 or w == 1 or x.stride(2) == w * x.stride(3):
        return x
    return x.contiguous()


def _pixel_stride(x: torch.Tensor) -> int:
    h, w = x.shape[2], x.shape[3]
    if h * w == 1:
        return 1
    return x.stride(2) if w == 1 else x.stride(3)


def _check_pairs(students: list[torch.Tensor], teachers: list[torch.Tensor], weights: list[float]):
    if not students or len(teachers) != len(students) or len(weights) != len(students):
        raise ValueError(
            f"fastkd: channel_attention_fwd_triton needs as many teachers and weights as students "
            f"(at least one), got {len(students)}, {len(teachers)} and {len(weights)}"
        )
    for i, (s, t) in enumerate(zip(students, teachers, strict=True)):
        for x in (s, t):
            if x.dim() != 4 or x.numel() == 0:
                raise ValueError(f"fastkd: pair {i}: maps must be non-empty 4-D [B, C, H, W]")
            if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"fastkd: the Triton kernels take float32/bfloat16/float16 maps, "
                                 f"got {x.dtype}")
        if s.shape[:2] != t.shape[:2]:
            raise ValueError(
                f"fastkd: pair {i}: student {tuple(s.shape)} and teacher {tuple(t.shape)} must "
                "share batch size and channel count"
            )


@triton_op("fastkd::channel_attention_fwd_triton", mutates_args=())
def channel_attention_fwd_triton(
    students: list[torch.Tensor],
    teachers: list[torch.Tensor],
    weights: list[float],
    mean: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_pairs(students, teachers, weights)
    students = [_evenly_spaced(s) for s in students]
    teachers = [_evenly_spaced(t) for t in teachers]
    device = students[0].device
    n = len(students)
    rows = [s.shape[0] * s.shape[1] for s in students]
    programs = [s.shape[0] * triton.cdiv(s.shape[1], _BLOCK_C) for s in students]
    diff = torch.empty(sum(rows), device=device, dtype=torch.float32)
    partial = torch.empty(sum(programs), device=device, dtype=torch.float32)
    done_rows = 0
    done_programs = 0
    for first in range(0, n, MAX_PAIRS):
        idx = list(range(first, min(first + MAX_PAIRS, n)))
        ss = [students[i] for i in idx]
        ts = [teachers[i] for i in idx]
        coefs = [float(weights[i]) / (rows[i] if mean else 1) for i in idx]
        gscale = [2.0 * c / (s.shape[2] * s.shape[3]) for c, s in zip(coefs, ss, strict=True)]
        offsets, starts = [], [0]
        for i in idx:
            offsets.append(done_rows)
            done_rows += rows[i]
            starts.append(starts[-1] + programs[i])
        starts = _padded(starts, starts[-1], MAX_PAIRS + 1)
        wrap_triton(_channel_attention_fwd_kernel)[(starts[-1],)](
            *_padded(ss, ss[0]), *_padded(ts, ts[0]),
            *_padded([s.stride(0) for s in ss], 0),
            *_padded([s.stride(1) for s in ss], 0),
            *_padded([_pixel_stride(s) for s in ss], 0),
            *_padded([t.stride(0) for t in ts], 0),
            *_padded([t.stride(1) for t in ts], 0),
            *_padded([_pixel_stride(t) for t in ts], 0),
            *_padded([s.shape[1] for s in ss], 0),
            *_padded([s.shape[2] * s.shape[3] for s in ss], 0),
            *_padded([t.shape[2] * t.shape[3] for t in ts], 0),
            *_padded(coefs, 0.0), *_padded(gscale, 0.0), *_padded(offsets, 0),
            *starts,
            diff, partial[done_programs:],
            NUM_PAIRS=len(idx), BLOCK_C=_BLOCK_C, BLOCK_P=_BLOCK_P,
            # Two [BLOCK_C, BLOCK_P] float32 accumulators: 16 elements per thread at 4 warps took
            # 128 registers and spilled 24 bytes (sm_80, Triton 3.6); 8 warps halve that.
            num_warps=8, maxnreg=MAXNREG,
        )
        done_programs += starts[-1]
    return partial.sum(), diff


@triton_op(
    "fastkd::channel_attention_bwd_triton",
    mutates_args=(),
    schema=(
        "(Tensor[] diffs, Tensor grad_output, SymInt[] sizes, bool[] channels_last, "
        "ScalarType dtype) -> Tensor[]"
    ),
)
def channel_attention_bwd_triton(
    diffs: list[torch.Tensor],
    grad_output: torch.Tensor,
    sizes: list[int],
    channels_last: list[bool],
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    n = len(diffs)
    if len(sizes) != 4 * n or len(channels_last) != n:
        raise ValueError(
            f"fastkd: channel_attention_bwd_triton needs 4 sizes and one channels_last flag per "
            f"diff ({n} diffs), got {len(sizes)} and {len(channels_last)}"
        )
    go = grad_output.to(torch.float32)
    grads, layouts, programs = [], [], []
    for i, d in enumerate(diffs):
        b, c, h, w = sizes[4 * i : 4 * i + 4]
        if tuple(d.shape) != (b, c) or d.dtype != torch.float32 or not d.is_contiguous():
            raise ValueError(
                f"fastkd: diff {i} must be a contiguous float32 [{b}, {c}] tensor, got "
                f"{d.dtype} of shape {tuple(d.shape)}"
            )
        cl = channels_last[i] and c > 1 and h * w > 1
        fmt = torch.channels_last if cl else torch.contiguous_format
        grads.append(torch.empty((b, c, h, w), dtype=dtype, device=d.device, memory_format=fmt))
        layouts.append((1, c) if cl else (h * w, 1))
        programs.append(b * triton.cdiv(c, _BLOCK_C) * triton.cdiv(h * w, _BLOCK_P))
    for first in range(0, n, MAX_PAIRS):
        idx = list(range(first, min(first + MAX_PAIRS, n)))
        starts = [0]
        for i in idx:
            starts.append(starts[-1] + programs[i])
        starts = _padded(starts, starts[-1], MAX_PAIRS + 1)
        wrap_triton(_channel_attention_bwd_kernel)[(starts[-1],)](
            *_padded([grads[i] for i in idx], grads[idx[0]]),
            *_padded([diffs[i] for i in idx], diffs[idx[0]]),
            *_padded([sizes[4 * i + 1] for i in idx], 0),
            *_padded([sizes[4 * i + 2] * sizes[4 * i + 3] for i in idx], 0),
            *_padded([layouts[i][0] for i in idx], 0),
            *_padded([layouts[i][1] for i in idx], 0),
            *starts,
            go,
            NUM_PAIRS=len(idx), BLOCK_C=_BLOCK_C, BLOCK_P=_BLOCK_P, maxnreg=MAXNREG,
        )
    return grads
