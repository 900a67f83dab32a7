"""Benchmark cases of ``fastkd.channel_attention_loss`` (Channel Distillation).

A case's shape ``B x C x H x W`` is the first student map; the variant says how many maps and in
which memory format:

* ``stages`` / ``stages-cl`` -- four pairs, the stages of a ResNet: ``[B, C * 2^i, H / 2^i,
  W / 2^i]`` for i = 0..3 (rounded up), in one call. ``64x64x56x56`` is ResNet-18 at batch 64,
  ``256x256x56x56`` ResNet-50 at batch 256.
* ``map`` / ``map-cl`` -- one pair of ``[B, C, H, W]`` maps.

``-cl`` variants hold every map channels_last, the others contiguous NCHW. Teachers have the
students' shapes, dtype and memory format (the usual CD set-up: a connector maps each student
stage to the teacher's channel count).

Implementations: fastkd (backend ``auto``, plus each backend asked for), PyTorch eager written the
way the official CD code does it (per stage, ``(s.mean((2, 3)) - t.mean((2, 3))).pow(2).mean()``,
summed), and ``torch.compile`` of that eager function. There is no Liger-Kernel equivalent.

Fewest bytes moved, for student and teacher maps of ``n_i`` elements of size ``e`` per pair::

    fwd    = sum_i 2 * n_i * e          (each map read once)
    fwdbwd = fwd + sum_i n_i * e        (the students' gradients, written once)
    bwd    = sum_i n_i * e
"""

from __future__ import annotations

import math

import torch

import fastkd
from fastkd.functional.channel_attention import _choose_backend

from ._core import Case, Impl, Inputs, LossBench, Selection, Skip, fastkd_impls, peer_impls

VARIANTS = {
    "stages": "4 ResNet stages from this shape (C x2, H, W /2 per stage), NCHW, one call",
    "stages-cl": "4 ResNet stages from this shape, channels_last, one call",
    "map": "one pair of maps of this shape, NCHW",
    "map-cl": "one pair of maps of this shape, channels_last",
}


def stage_shapes(case: Case) -> list[tuple[int, int, int, int]]:
    b, c, h, w = case.shape
    if case.variant.startswith("map"):
        return [(b, c, h, w)]
    return [(b, c << i, -(-h // (1 << i)), -(-w // (1 << i))) for i in range(4)]


def eager_channel_attention(students: tuple, teachers: tuple) -> torch.Tensor:
    """Channel Distillation's loss as its official code writes it."""
    loss = None
    for s, t in zip(students, teachers, strict=True):
        term = (s.mean(dim=(2, 3)) - t.mean(dim=(2, 3))).pow(2).mean()
        loss = term if loss is None else loss + term
    return loss


def fastkd_channel_attention(backend: str):
    def channel_attention_fastkd(students: tuple, teachers: tuple) -> torch.Tensor:
        return fastkd.channel_attention_loss(students, teachers, backend=backend)

    return channel_attention_fastkd


class ChannelAttentionBench(LossBench):
    name = "channel_attention"
    variants = VARIANTS
    default_variants = ("stages", "stages-cl", "map", "map-cl")
    shapes = ((64, 64, 56, 56), (64, 256, 28, 28))
    quick_shapes = ((4, 16, 16, 16), (8, 32, 8, 8))

    def make_inputs(self, case: Case, device: str, requires_grad: bool, seed: int) -> Inputs:
        if len(case.shape) != 4:
            raise ValueError(f"channel_attention: shapes are BxCxHxW, got {case.shape}")
        g = torch.Generator(device=device).manual_seed(seed)
        fmt = torch.channels_last if case.variant.endswith("-cl") else torch.contiguous_format

        def feature_map(shape) -> torch.Tensor:
            x = torch.randn(shape, generator=g, device=device)
            x += torch.randn(shape[0], shape[1], 1, 1, generator=g, device=device)
            return x.to(case.torch_dtype).contiguous(memory_format=fmt)

        shapes = stage_shapes(case)
        students = tuple(feature_map(s).requires_grad_(requires_grad) for s in shapes)
        teachers = tuple(feature_map(s) for s in shapes)
        return Inputs((students, teachers), students if requires_grad else ())

    def impls(self, case: Case, sel: Selection) -> list[Impl | Skip]:
        probe = torch.empty((1, 1, 1, 1), dtype=case.torch_dtype, device=sel.device)
        no_liger = Skip("liger", "Liger-Kernel has no channel-attention loss")
        return fastkd_impls(
            sel, lambda b: _choose_backend([probe], b), fastkd_channel_attention
        ) + peer_impls(self.name, sel, eager_channel_attention, lambda: no_liger)

    def min_bytes(self, case: Case, mode: str) -> int:
        e = torch.tensor([], dtype=case.torch_dtype).element_size()
        student = sum(math.prod(s) for s in stage_shapes(case)) * e
        if mode == "bwd":
            return student
        if mode == "fwd":
            return 2 * student
        if mode == "fwdbwd":
            return 3 * student
        raise ValueError(f"unknown mode {mode!r}")

    def reference(self, case: Case, inputs: Inputs) -> float | None:
        students, teachers = inputs.args
        with torch.no_grad():
            loss = fastkd.reference.channel_attention_loss_ref(
                [s.detach() for s in students], list(teachers)
            )
        return float(loss)


BENCH = ChannelAttentionBench()
