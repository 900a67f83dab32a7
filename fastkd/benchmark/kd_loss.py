"""Benchmark cases of ``fastkd.kd_loss``.

Variants (temperature 4 throughout):

* ``plain``   -- ``T^2 KL(softmax(t/T) || softmax(s/T))``, batchmean.
* ``ce``      -- ``0.9 * KD + 0.1 * CE(s, y)``: the usual mix with hard labels.
* ``guided``  -- guided KD: only rows whose teacher argmax equals the label count, divided by their
  number (labels agree with the teacher on about 70 % of rows).
* ``cohort3`` -- KD summed over three teachers (a DIH-style cohort).
* ``reverse``, ``jsd`` -- reverse KL ``T^2 KL(q || p)`` and the generalised Jensen-Shannon
  divergence at ``beta = 0.5``, at T=1 as in on-policy language-model distillation. Eager is TRL's
  ``generalized_jsd_loss`` as it is written (``beta=1`` is its reverse KL), times ``T^2``; Liger's
  peer is ``LigerJSD`` (CUDA only). The issue's target shape: ``[4096, 32000]`` fp32.
* ``sparse64``, ``sparse32`` -- KD from a sparse teacher: the teacher's top 64 (32) classes as
  float32 log-probabilities with int32 ids, tail ``"uniform"`` (``fastkd.SparseTeacher``). Peers:
  ``fastkd-dense`` (fastkd on the same target materialised as a dense teacher), eager on the
  densified target as people write it today (``full`` + ``scatter`` of the tail and the k values,
  ``log_softmax``, ``kl_div``) and ``torch.compile`` of that. The issue's targets: ``sparse64``
  at 4096x32000 fp32, ``sparse32`` at 512x128256 bf16 next to ``plain``.

Implementations: fastkd (backend ``auto``, plus each backend asked for), PyTorch eager written the
way KD code usually is (``F.kl_div`` on two ``log_softmax`` with ``log_target=True``, times
``T^2``, plus ``F.cross_entropy``), ``torch.compile`` of that same eager function, and
Liger-Kernel's ``LigerKLDIVLoss`` applied to the log-softmaxed logits (CUDA only).

Fewest bytes moved, for ``[rows, C]`` logits of element size ``e`` and ``k`` teachers::

    fwd    = rows * C * e * (1 + k)  (+ 8 * rows for int64 labels when the variant uses them)
    fwdbwd = fwd + rows * C * e      (the student's gradient, written once)
    bwd    = rows * C * e

A sparse teacher replaces the teacher's ``C * e`` bytes per row by ``k * (4 + 4)`` (int32 id and
float32 value), the teacher bytes per row that ``--list`` and the variant's description give; the
dense peer moves more than this count, which its GB/s column then understates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastkd
from fastkd.functional.kd_loss import _choose_backend

from ._core import (
    Case,
    Impl,
    Inputs,
    LossBench,
    Selection,
    Skip,
    constant,
    fastkd_impls,
    peer_impls,
)

LABEL_BYTES = 8
# Above this many logits per tensor the float32 reference check is skipped: its temporaries would
# need several times the inputs' memory.
MAX_CHECKED_NUMEL = 1 << 28
# Share of rows whose label is the teacher's argmax (what guided KD keeps).
TEACHER_RIGHT = 0.7


@dataclass(frozen=True)
class Variant:
    description: str
    temperature: float = 4.0
    alpha: float | None = None
    guided: bool = False
    teachers: int = 1
    # Classes of the sparse teacher's top k (None: a dense teacher).
    sparse_k: int | None = None
    divergence: str = "forward_kl"
    beta: float = 0.5

    @property
    def labels(self) -> bool:
        return self.alpha is not None or self.guided


VARIANTS = {
    "plain": Variant("KD alone, T=4"),
    "ce": Variant("0.9 * KD + 0.1 * cross-entropy on labels, T=4", alpha=0.9),
    "guided": Variant("guided KD: rows whose teacher is right count, T=4", guided=True),
    "cohort3": Variant("KD summed over 3 teachers, T=4", teachers=3),
    "reverse": Variant("reverse KL, T^2 KL(q || p), T=1", temperature=1.0,
                       divergence="reverse_kl"),
    "jsd": Variant("generalised JSD, beta=0.5, times T^2, T=1", temperature=1.0,
                   divergence="jsd"),
    "sparse64": Variant("KD from the teacher's top 64 classes (SparseTeacher, uniform tail), "
                        "T=4; teacher read: 512 B/row", sparse_k=64),
    "sparse32": Variant("KD from the teacher's top 32 classes (SparseTeacher, uniform tail), "
                        "T=4; teacher read: 256 B/row", sparse_k=32),
}
# Bytes a sparse teacher's class id and value take (int32, float32).
SPARSE_ENTRY_BYTES = 4 + 4


def eager_kd(variant: Variant):
    """The KD loss as people write it in PyTorch, for one variant."""
    T, alpha, guided = variant.temperature, variant.alpha, variant.guided
    if variant.divergence != "forward_kl":
        return eager_generalized_jsd(variant)

    def kd_loss_eager(s: torch.Tensor, teachers: tuple, y: torch.Tensor | None) -> torch.Tensor:
        log_q = F.log_softmax(s / T, dim=-1)
        kd = None
        for t in teachers:
            log_p = F.log_softmax(t / T, dim=-1)
            if guided:
                per_row = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
                right = t.argmax(-1) == y
                term = (per_row * right).sum() / right.sum().clamp_min(1) * (T * T)
            else:
                term = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (T * T)
            kd = term if kd is None else kd + term
        if alpha is None:
            return kd
        return alpha * kd + (1.0 - alpha) * F.cross_entropy(s, y)

    return kd_loss_eager


def eager_generalized_jsd(variant: Variant):
    """TRL's ``generalized_jsd_loss`` (its GKD trainer) as it is written there, batchmean, times
    ``T^2``: reverse KL is its ``beta=1`` branch, the JSD its log-mixture of two ``kl_div``s."""
    T = variant.temperature
    beta = 1.0 if variant.divergence == "reverse_kl" else variant.beta

    def generalized_jsd_eager(s: torch.Tensor, teachers: tuple, y: torch.Tensor | None):
        student_log_probs = F.log_softmax(s / T, dim=-1)
        teacher_log_probs = F.log_softmax(teachers[0] / T, dim=-1)
        if beta == 1.0:
            jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none",
                           log_target=True)
        else:
            b = torch.tensor(beta, dtype=student_log_probs.dtype, device=s.device)
            mixture_log_probs = torch.logsumexp(
                torch.stack([student_log_probs + torch.log(1 - b),
                             teacher_log_probs + torch.log(b)]),
                dim=0,
            )
            kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none",
                                  log_target=True)
            kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none",
                                  log_target=True)
            jsd = b * kl_teacher + (1 - b) * kl_student
        return jsd.sum() / jsd.size(0) * (T * T)

    return generalized_jsd_eager


def liger_jsd(variant: Variant):
    """``LigerJSD`` on log-softmaxed logits (its beta=1 is reverse KL), times ``T^2``."""
    from liger_kernel.transformers import LigerJSD

    T = variant.temperature
    jsd = LigerJSD(beta=1.0 if variant.divergence == "reverse_kl" else variant.beta)

    def jsd_liger(s: torch.Tensor, teachers: tuple, y: torch.Tensor | None) -> torch.Tensor:
        return jsd(F.log_softmax(s / T, dim=-1), F.log_softmax(teachers[0] / T, dim=-1)) * T * T

    return jsd_liger


def liger_kd(variant: Variant):
    """KD through ``LigerKLDIVLoss`` on log-softmaxed logits, CE in eager PyTorch."""
    from liger_kernel.transformers import LigerKLDIVLoss

    T, alpha = variant.temperature, variant.alpha
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def kd_loss_liger(s: torch.Tensor, teachers: tuple, y: torch.Tensor | None) -> torch.Tensor:
        log_q = F.log_softmax(s / T, dim=-1)
        kd = None
        for t in teachers:
            term = kl(log_q, F.log_softmax(t / T, dim=-1)) * (T * T)
            kd = term if kd is None else kd + term
        if alpha is None:
            return kd
        return alpha * kd + (1.0 - alpha) * F.cross_entropy(s, y)

    return kd_loss_liger


def eager_sparse_kd(variant: Variant):
    """KD from a sparse (top-k) teacher as people write it today: the densified target (the
    uniform tail, then the k log-probabilities scattered over it), log_softmax, kl_div."""
    T = variant.temperature

    def kd_loss_eager_sparse(s: torch.Tensor, dense: torch.Tensor, ids: torch.Tensor,
                             values: torch.Tensor) -> torch.Tensor:
        classes, k = s.shape[-1], ids.shape[-1]
        mass = (1.0 - values.exp().sum(-1, keepdim=True)).clamp_min(0.0)
        tail = torch.log(mass / (classes - k))
        d = tail.expand(-1, classes).scatter(-1, ids.long(), values)
        log_q = F.log_softmax(s / T, dim=-1)
        log_p = F.log_softmax(d / T, dim=-1)
        return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * (T * T)

    return kd_loss_eager_sparse


def fastkd_sparse_kd(variant: Variant, backend: str, dense: bool = False):
    """fastkd on the sparse teacher, or (``dense``) on the dense teacher of the same rows."""

    def kd_loss_fastkd_sparse(s: torch.Tensor, teacher: torch.Tensor, ids: torch.Tensor,
                              values: torch.Tensor) -> torch.Tensor:
        t = teacher if dense else fastkd.SparseTeacher(ids, values)
        return fastkd.kd_loss(s, t, temperature=variant.temperature, backend=backend)

    return kd_loss_fastkd_sparse


def fastkd_kd(variant: Variant, backend: str):
    def kd_loss_fastkd(s: torch.Tensor, teachers: tuple, y: torch.Tensor | None) -> torch.Tensor:
        return fastkd.kd_loss(
            s,
            teachers[0] if len(teachers) == 1 else teachers,
            y,
            temperature=variant.temperature,
            alpha=variant.alpha,
            guided=variant.guided,
            divergence=variant.divergence,
            beta=variant.beta,
            backend=backend,
        )

    return kd_loss_fastkd


class KDLossBench(LossBench):
    name = "kd_loss"
    variants = {name: v.description for name, v in VARIANTS.items()}
    default_variants = ("plain", "ce")
    shapes = ((256, 100), (1024, 1000), (4096, 1000), (512, 32000))
    quick_shapes = ((64, 100), (256, 1000))

    def make_inputs(self, case: Case, device: str, requires_grad: bool, seed: int) -> Inputs:
        v = VARIANTS[case.variant]
        g = torch.Generator(device=device).manual_seed(seed)
        classes = case.shape[-1]

        def logits() -> torch.Tensor:
            x = torch.randn(case.shape, generator=g, device=device).mul_(2.0)
            return x.to(case.torch_dtype)

        student = logits().requires_grad_(requires_grad)
        teachers = tuple(logits() for _ in range(v.teachers))
        if v.sparse_k is not None:
            top = fastkd.SparseTeacher.from_logits(teachers[0], v.sparse_k)
            ids = top.indices.to(torch.int32)
            # The dense peer reads the dense target of the same rows (the same loss).
            _, _, tails = top._for_kernel(classes, torch.float32)
            dense = tails.view(*case.shape[:-1], 1).expand(case.shape).scatter(-1, top.indices,
                                                                                 top.values)
            return Inputs((student, dense.to(case.torch_dtype), ids, top.values),
                          (student,) if requires_grad else ())
        labels = None
        if v.labels:
            random = torch.randint(0, classes, case.shape[:-1], generator=g, device=device)
            keep = torch.rand(case.shape[:-1], generator=g, device=device) < TEACHER_RIGHT
            labels = torch.where(keep, teachers[0].argmax(-1), random)
        return Inputs((student, teachers, labels), (student,) if requires_grad else ())

    def impls(self, case: Case, sel: Selection) -> list[Impl | Skip]:
        v = VARIANTS[case.variant]
        probe = torch.empty(0, dtype=case.torch_dtype, device=sel.device)
        if v.sparse_k is not None:
            return self._sparse_impls(v, case, sel)
        return fastkd_impls(
            sel,
            lambda b: _choose_backend(probe, [probe] * v.teachers, b),
            lambda backend: fastkd_kd(v, backend),
        ) + peer_impls(self.name, sel, eager_kd(v), lambda: self._liger(v, sel.device))

    def _sparse_impls(self, v: Variant, case: Case, sel: Selection) -> list[Impl | Skip]:
        probe = torch.empty(1, case.shape[-1], dtype=case.torch_dtype, device=sel.device)
        top = fastkd.SparseTeacher(
            torch.zeros(1, min(v.sparse_k, case.shape[-1]), dtype=torch.int32, device=sel.device),
            torch.zeros(1, min(v.sparse_k, case.shape[-1]), device=sel.device),
        )
        impls = fastkd_impls(
            sel,
            lambda b: _choose_backend(probe, [top], b),
            lambda backend: fastkd_sparse_kd(v, backend),
        )
        try:
            dense_backend = _choose_backend(probe, [probe], "auto")
            impls.append(Impl("fastkd-dense", constant(fastkd_sparse_kd(v, dense_backend, True)),
                              dense_backend))
        except ValueError as e:
            impls.append(Skip("fastkd-dense", str(e)))
        return impls + peer_impls(self.name, sel, eager_sparse_kd(v), _no_sparse_liger)

    @staticmethod
    def _liger(v: Variant, device: str) -> Impl | Skip:
        if device != "cuda":
            return Skip("liger", "Liger-Kernel runs on CUDA only")
        if v.guided:
            return Skip("liger", "LigerKLDIVLoss takes no row mask, so guided KD has no Liger form")
        try:
            fn = liger_kd(v) if v.divergence == "forward_kl" else liger_jsd(v)
        except ImportError as e:
            return Skip("liger", f"liger_kernel is not importable ({e})")
        return Impl("liger", constant(fn))

    def min_bytes(self, case: Case, mode: str) -> int:
        v = VARIANTS[case.variant]
        rows = math.prod(case.shape[:-1])
        tensor = case.numel * torch.tensor([], dtype=case.torch_dtype).element_size()
        if mode == "bwd":
            return tensor
        if v.sparse_k is not None:
            teacher = rows * min(v.sparse_k, case.shape[-1]) * SPARSE_ENTRY_BYTES
        else:
            teacher = tensor * v.teachers
        fwd = tensor + teacher + (LABEL_BYTES * rows if v.labels else 0)
        if mode == "fwd":
            return fwd
        if mode == "fwdbwd":
            return fwd + tensor
        raise ValueError(f"unknown mode {mode!r}")

    def reference(self, case: Case, inputs: Inputs) -> float | None:
        if case.numel > MAX_CHECKED_NUMEL:
            return None
        v = VARIANTS[case.variant]
        if v.sparse_k is not None:
            s, _, ids, values = inputs.args
            with torch.no_grad():
                loss = fastkd.reference.kd_loss_ref(
                    s.detach(), fastkd.SparseTeacher(ids, values), temperature=v.temperature
                )
            return float(loss)
        s, teachers, labels = inputs.args
        with torch.no_grad():
            loss = fastkd.reference.kd_loss_ref(
                s.detach(),
                list(teachers),
                labels,
                temperature=v.temperature,
                alpha=v.alpha,
                guided=v.guided,
                divergence=v.divergence,
                beta=v.beta,
            )
        return float(loss)


def _no_sparse_liger() -> Skip:
    return Skip("liger", "Liger-Kernel has no sparse-teacher KD")


BENCH = KDLossBench()
