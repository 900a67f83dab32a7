"""``fastkd.feature_regression_loss``: FitNet hints, neighbourhood distillation and FEED, fused.

For pairs ``i`` of student and teacher features of one shape ``[B, ...]`` (``[B, C, H, W]`` maps,
``[B, D]`` embeddings, ``[B, L, D]`` tokens), ``D_i`` elements per sample and ``N_i = B * D_i``::

    loss = sum_i w_i * R_i,    R_i = (1 / N_i) * sum |a_i - b_i|^p       (reduction="mean")
                               R_i = sum |a_i - b_i|^p                   (reduction="sum")

``p=2`` is the squared error of FitNet hints and Neighbourhood Distillation (docs/methods.md#nd),
``p=1`` the absolute error. With ``normalize=True`` every sample's flattened map is first divided
by its L2 norm, ``n(x) = x / max(||x||, 1e-12)`` (``F.normalize(x.flatten(1), dim=1)``), for the
student and the teacher alike -- with ``p=1`` the Factor-Transfer / FEED loss
(docs/methods.md#feed). The gradient goes to the student only; per sample, with
``g = sign(n(a) - n(b))`` (``p=1``; ``sign(0) = 0``) or ``g = 2 (n(a) - n(b))`` (``p=2``)
scaled by ``w_i / N_i``::

    d R / d a = (g - n(a) <n(a), g>) / ||a||     (||a|| >= eps)
    d R / d a = g / eps                           (||a|| < eps, where n(a) = a / eps is linear)

so an all-zero sample gets a finite (large) gradient; in float16 it saturates at +-65504.

The compiled backends take all pairs of one call in one kernel launch (grouped, up to 8 pairs per
launch) and write the student's gradient while they compute the loss; the backward only rescales
it by ``grad_output``. Each tensor is read as a flat array per sample, so contiguous and
channels_last features run without a copy. A teacher whose layout differs from its student's is
copied once into the student's layout; a student that is not dense with contiguous samples (e.g.
a slice along a non-leading dim) is copied once to contiguous memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real

import torch

from .. import backends
from .._inputs import (
    check_choice,
    check_float_tensor,
    check_same_device,
    check_tensor_list,
    check_weights,
    same_layout,
    sample_blocked,
    weights_for,
)
from ..ops import OnePassGroupLoss

REDUCTIONS = ("mean", "sum")
# Pairs one compiled launch takes (csrc/feature_regression.h: kMaxRegressionPairs).
MAX_KERNEL_PAIRS = 8


def feature_regression_loss(
    student_feats: torch.Tensor | Sequence[torch.Tensor],
    teacher_feats: torch.Tensor | Sequence[torch.Tensor],
    *,
    p: int = 2,
    normalize: bool = False,
    weights: Sequence[float] | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Weighted sum over (student, teacher) pairs of the mean (or summed) ``|a - b|^p``, optionally
    between per-sample L2-normalised features.

    Args:
        student_feats: a ``[B, ...]`` tensor (at least 2-D, samples first) or a list/tuple of them
            (one per stage or per teacher); float32/bfloat16/float16 (float64 on CPU).
        teacher_feats: as many tensors, each of its student's shape, any float dtype (float64 only
            with float64 students). Never differentiated.
        p: 2 (squared error) or 1 (absolute error).
        normalize: L2-normalise each sample's flattened features first (FEED / Factor Transfer).
        weights: one non-negative weight per pair (default all 1.0).
        reduction: ``"mean"`` over each pair's elements (default) or ``"sum"``.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Returns:
        A float32 scalar (float64 for float64 inputs).
    """
    options = _check_options(
        p=p, normalize=normalize, weights=weights, reduction=reduction, backend=backend
    )
    return _feature_regression_loss(student_feats, teacher_feats, **options)


def _check_options(
    *,
    p: int,
    normalize: bool,
    weights: Sequence[float] | None,
    reduction: str,
    backend: str,
) -> dict:
    """The keyword arguments of `feature_regression_loss`, checked, as `_feature_regression_loss`
    takes them (the weights' count is checked against the pairs at each call)."""
    if isinstance(p, bool) or not isinstance(p, Real):
        raise TypeError(f"p must be 1 or 2, got {type(p).__name__}")
    if p not in (1, 2):
        raise ValueError(f"p must be 1 (absolute error) or 2 (squared error), got {p!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    return {
        "p": int(p),
        "normalize": normalize,
        "weights": check_weights(weights, "weights"),
        "reduction": check_choice(reduction, "reduction", REDUCTIONS),
        "backend": check_choice(backend, "backend", backends.CHOICES),
    }


def _feature_regression_loss(
    student_feats: torch.Tensor | Sequence[torch.Tensor],
    teacher_feats: torch.Tensor | Sequence[torch.Tensor],
    *,
    p: int,
    normalize: bool,
    weights: list[float] | None,
    reduction: str,
    backend: str,
) -> torch.Tensor:
    """`feature_regression_loss` with keyword arguments that `_check_options` returned
    (``fastkd.nn.FeatureRegressionLoss`` checks them once, when it is built); the tensors are
    checked here."""
    students, teachers = _check_feats(student_feats, teacher_feats)
    weights = weights_for(weights, len(students), "weights", "pair")
    chosen = _choose_backend(students, backend)
    if chosen == "torch":
        from ..reference import feature_regression_loss_ref

        return feature_regression_loss_ref(
            students, teachers, p=p, normalize=normalize, weights=weights, reduction=reduction
        )

    if chosen == "triton":
        fwd = torch.ops.fastkd.feature_regression_fwd_triton
        scale = torch.ops.fastkd.scale_grads_triton_
    else:
        fwd, scale = torch.ops.fastkd.feature_regression_fwd, torch.ops.fastkd.scale_grads_
    grad_enabled = torch.is_grad_enabled()
    # One launch per (student dtype, teacher dtype) group of up to MAX_KERNEL_PAIRS pairs; a
    # usual call (all stages in one dtype, at most 8 of them) is a single launch.
    groups: dict[tuple[torch.dtype, torch.dtype], list[tuple]] = {}
    for s, t, w in zip(students, teachers, weights, strict=True):
        # Detached: the teacher is never differentiated, and a teacher that requires grad must not
        # make the loss of a frozen student differentiable.
        t = t.detach()
        if not sample_blocked(s):
            s = s.contiguous()
        if not (sample_blocked(t) and same_layout(s, t)):
            t = torch.empty_like(s, dtype=t.dtype).copy_(t)
        needs_grad = grad_enabled and s.requires_grad
        groups.setdefault((s.dtype, t.dtype), []).append((s, t, w, needs_grad))
    total = None
    for pairs in groups.values():
        for start in range(0, len(pairs), MAX_KERNEL_PAIRS):
            chunk = pairs[start : start + MAX_KERNEL_PAIRS]
            group = [c[0] for c in chunk]
            args = ([c[1] for c in chunk], [c[2] for c in chunk], p, normalize, reduction == "mean")
            flags = [c[3] for c in chunk]
            if any(flags):
                loss = OnePassGroupLoss.apply(fwd, scale, args, flags, *group)
            else:
                loss, _ = fwd(group, *args, flags)
            total = loss if total is None else total + loss
    return total


def _check_feats(student_feats, teacher_feats) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    students = check_tensor_list(student_feats, "student_feats")
    teachers = check_tensor_list(teacher_feats, "teacher_feats")
    if len(students) != len(teachers):
        raise ValueError(
            "student_feats and teacher_feats must hold one teacher tensor per student tensor, got "
            f"{len(students)} student and {len(teachers)} teacher tensors"
        )
    single = len(students) == 1
    for i, (s, t) in enumerate(zip(students, teachers, strict=True)):
        sname = "student_feats" if single else f"student_feats[{i}]"
        tname = "teacher_feats" if single else f"teacher_feats[{i}]"
        check_float_tensor(s, sname)
        check_float_tensor(t, tname)
        check_same_device(students[0], s, sname, "student_feats[0]")
        check_same_device(students[0], t, tname, "student_feats[0]" if not single else sname)
        if s.dim() < 2:
            raise ValueError(
                f"{sname} must be at least 2-D with samples first ([B, C, H, W], [B, D] or "
                f"[B, L, D]), got a {s.dim()}-D tensor of shape {tuple(s.shape)}"
            )
        if t.shape != s.shape:
            raise ValueError(
                f"{tname} must have the shape of {sname}, {tuple(s.shape)}, got {tuple(t.shape)}"
            )
        if s.numel() == 0:
            raise ValueError(f"{sname} must not be empty, got shape {tuple(s.shape)}")
    f64 = {x.dtype == torch.float64 for x in [*students, *teachers]}
    if len(f64) > 1:
        raise TypeError(
            "float64 features must be float64 for student_feats and teacher_feats alike, got "
            f"{', '.join(str(x.dtype) for x in students)} and "
            f"{', '.join(str(x.dtype) for x in teachers)}"
        )
    return students, teachers


def _choose_backend(students: list[torch.Tensor], requested: str) -> str:
    def gpu_reason() -> str | None:
        if students[0].dtype == torch.float64:
            return "float64 runs on the CPU backend only"
        return None

    # A tuning table's size measure for this loss: the longest sample, in elements.
    return backends.choose(
        "feature_regression",
        requested,
        students[0].device,
        {"cuda": gpu_reason, "triton": gpu_reason},
        dtype=students[0].dtype,
        size=max(s.numel() // s.shape[0] for s in students),
    )
