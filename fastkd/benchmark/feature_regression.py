"""Benchmark cases of ``fastkd.feature_regression_loss``.

Variants (weights 1, reduction mean):

* ``mse``    -- squared error (FitNet hints, neighbourhood distillation) on one map.
* ``feed``   -- L1 between per-sample L2-normalised maps (FEED / Factor Transfer) on one map.
* ``mse-stages``, ``feed-stages`` -- the same over four stages in one call, derived from the
  case's shape ``[B, C, H, W]`` as ResNets grow them: stage ``i`` is ``[B, C 2^i, H / 2^i,
  W / 2^i]`` (``64x64x56x56`` gives ResNet-18's stages at B = 64, ``256x256x56x56`` ResNet-50's
  at B = 256). Only shapes whose H and W divide by 8.
* ``-cl`` on any of them: every map channels_last.
* ``l1``, ``nmse`` (on request): plain L1; squared error between normalised maps.

Implementations: fastkd (backend ``auto``, plus each backend asked for), PyTorch eager written the
way distillation code usually is (``F.mse_loss`` / ``F.l1_loss``, after ``F.normalize`` of the
flattened maps for the normalised variants, summed over pairs) and ``torch.compile`` of that same
eager function. Liger-Kernel has no feature-regression loss.

Fewest bytes moved, summed over pairs, for maps of ``n`` elements of size ``e``::

    fwd    = 2 * n * e       (student and teacher read once)
    fwdbwd = fwd + n * e     (the student's gradient, written once)
    bwd    = n * e
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastkd
from fastkd.functional.feature_regression import _choose_backend

from ._core import Case, Impl, Inputs, LossBench, Selection, Skip, fastkd_impls, peer_impls

STAGES = 4
# Stage variants run on these shapes unless shapes are given on the command line.
STAGE_SHAPES = ((64, 64, 56, 56),)
QUICK_STAGE_SHAPES = ((8, 32, 32, 32),)
# Above this many elements in all pairs together the float32 reference check is skipped.
MAX_CHECKED_NUMEL = 1 << 28


@dataclass(frozen=True)
class Variant:
    description: str
    p: int
    normalize: bool
    stages: int = 1
    channels_last: bool = False


def _variants() -> dict[str, Variant]:
    base = {
        "mse": ("squared error", 2, False),
        "feed": ("L1 between per-sample L2-normalised maps (FEED)", 1, True),
        "l1": ("absolute error", 1, False),
        "nmse": ("squared error between per-sample L2-normalised maps", 2, True),
    }
    out = {}
    for name, (text, p, normalize) in base.items():
        for stages in (1, STAGES):
            for cl in (False, True):
                key = name + ("-stages" if stages > 1 else "") + ("-cl" if cl else "")
                where = f"{STAGES} ResNet stages in one call" if stages > 1 else "one map"
                layout = "channels_last" if cl else "NCHW"
                out[key] = Variant(f"{text}, {where}, {layout}", p, normalize, stages, cl)
    return out


VARIANTS = _variants()


def pair_shapes(case: Case) -> list[tuple[int, ...]]:
    v = VARIANTS[case.variant]
    if v.stages == 1:
        return [case.shape]
    b, c, h, w = case.shape
    return [(b, c << i, h >> i, w >> i) for i in range(v.stages)]


def _stageable(shape: tuple[int, ...], stages: int) -> bool:
    scale = 1 << (stages - 1)
    return len(shape) == 4 and shape[2] % scale == 0 and shape[3] % scale == 0


def eager_regression(v: Variant):
    """The loss as people write it in PyTorch, summed over the pairs."""

    def feature_regression_eager(students: tuple, teachers: tuple) -> torch.Tensor:
        total = None
        for s, t in zip(students, teachers, strict=True):
            if v.normalize:
                s = F.normalize(s.flatten(1), dim=1)
                t = F.normalize(t.flatten(1), dim=1)
            term = F.l1_loss(s, t) if v.p == 1 else F.mse_loss(s, t)
            total = term if total is None else total + term
        return total

    return feature_regression_eager


def fastkd_regression(v: Variant, backend: str):
    def feature_regression_fastkd(students: tuple, teachers: tuple) -> torch.Tensor:
        return fastkd.feature_regression_loss(
            students, teachers, p=v.p, normalize=v.normalize, backend=backend
        )

    return feature_regression_fastkd


class FeatureRegressionBench(LossBench):
    name = "feature_regression"
    variants = {name: v.description for name, v in VARIANTS.items()}
    default_variants = (
        "mse", "mse-cl", "feed", "feed-cl",
        "mse-stages", "mse-stages-cl", "feed-stages", "feed-stages-cl",
    )
    # By default the one-map variants run on [64, 256, 28, 28] (the targets' shape) and a large
    # single map, the stage variants on ResNet-18's stages at B = 64 (STAGE_SHAPES).
    shapes = ((64, 256, 28, 28), (8, 256, 112, 112)) + STAGE_SHAPES
    quick_shapes = ((8, 64, 16, 16),) + QUICK_STAGE_SHAPES

    def cases(self, sel: Selection) -> list[Case]:
        stage_shapes = QUICK_STAGE_SHAPES if sel.quick else STAGE_SHAPES
        out = []
        for case in super().cases(sel):
            v = VARIANTS[case.variant]
            if v.channels_last and len(case.shape) != 4:
                continue
            if v.stages > 1 and not (
                _stageable(case.shape, v.stages)
                and (sel.shapes is not None or case.shape in stage_shapes)
            ):
                continue
            if v.stages == 1 and sel.shapes is None and case.shape in stage_shapes:
                continue
            out.append(case)
        return out

    def make_inputs(self, case: Case, device: str, requires_grad: bool, seed: int) -> Inputs:
        v = VARIANTS[case.variant]
        g = torch.Generator(device=device).manual_seed(seed)
        fmt = torch.channels_last if v.channels_last else torch.contiguous_format

        def feats(shape) -> torch.Tensor:
            x = torch.randn(shape, generator=g, device=device).to(case.torch_dtype)
            return x.contiguous(memory_format=fmt) if len(shape) == 4 else x

        shapes = pair_shapes(case)
        students = tuple(feats(s).requires_grad_(requires_grad) for s in shapes)
        teachers = tuple(feats(s) for s in shapes)
        return Inputs((students, teachers), students if requires_grad else ())

    def impls(self, case: Case, sel: Selection) -> list[Impl | Skip]:
        v = VARIANTS[case.variant]
        probe = [torch.empty((1, 1), dtype=case.torch_dtype, device=sel.device)]
        no_liger = Skip("liger", "Liger-Kernel has no feature-regression loss")
        return fastkd_impls(
            sel, lambda b: _choose_backend(probe, b), lambda backend: fastkd_regression(v, backend)
        ) + peer_impls(self.name, sel, eager_regression(v), lambda: no_liger)

    def min_bytes(self, case: Case, mode: str) -> int:
        e = torch.tensor([], dtype=case.torch_dtype).element_size()
        n = sum(math.prod(s) for s in pair_shapes(case))
        if mode == "bwd":
            return n * e
        if mode == "fwd":
            return 2 * n * e
        if mode == "fwdbwd":
            return 3 * n * e
        raise ValueError(f"unknown mode {mode!r}")

    def reference(self, case: Case, inputs: Inputs) -> float | None:
        if sum(math.prod(s) for s in pair_shapes(case)) > MAX_CHECKED_NUMEL:
            return None
        v = VARIANTS[case.variant]
        students, teachers = inputs.args
        with torch.no_grad():
            loss = fastkd.reference.feature_regression_loss_ref(
                [s.detach() for s in students], list(teachers), p=v.p, normalize=v.normalize
            )
        return float(loss)


BENCH = FeatureRegressionBench()
