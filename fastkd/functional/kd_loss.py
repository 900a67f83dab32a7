"""``fastkd.kd_loss``: temperature-scaled knowledge distillation, fused.

For rows ``b`` (leading dims of ``[..., C]`` logits flattened), ``q = softmax(s / T)`` and, per
teacher ``k``, ``p_k = softmax(t_k / T)``::

    KD_k = T^2 * sum_{b in R_k} D(p_kb, q_b) / |R_k|              (reduction="batchmean")
    loss = alpha * sum_k w_k * KD_k + (1 - alpha) * CE(s, y)        (alpha given)
    loss = sum_k w_k * KD_k                                          (alpha=None)
    d loss / d s_b = alpha * T * sum_k w_k [b in R_k] dD(p_kb, q_b)/dz / |R_k|   (z = s_b / T)
                     + (1 - alpha) [b counted] (softmax(s_b) - target_b) / |counted|

The divergence ``D`` is, with ``m = beta * p + (1 - beta) * q`` and ``l = log``::

    "forward_kl" (default)  KL(p || q)                              dD/dz = q - p
    "reverse_kl"            KL(q || p)                              dD/dz = q (lq - lp - D)
    "jsd"                   beta KL(p || m) + (1 - beta) KL(q || m)
                            dD/dz = (1 - beta) q (lq - lm - KL(q || m))

``R_k`` are the counted rows (label != ignore_index; all rows without labels), restricted with
``guided=True`` to the rows where teacher ``k``'s argmax equals the label (GKD, Zhou et al. 2020);
``|R_k| = 0`` gives 0, never NaN. CE is at temperature 1 with target
``(1 - eps) * onehot(y) + eps / C``. ``"sum"`` drops the division, ``"mean"`` divides the KD part
by ``|R_k| * C`` (torch's element-wise mean) and the CE part by ``|counted|``, ``"none"`` returns
each row's ``alpha * sum_k w_k T^2 KL_kb [b in R_k] + (1 - alpha) CE_b``.

A sparse teacher (``fastkd.SparseTeacher``, k classes per row) is the dense teacher ``d`` it stands
for (its k values on its ids, one tail constant on the other classes) in every term and option; its
argmax is ``d``'s. The kernels read its O(k) entries per row and never build ``d``; they take the
dense teachers first, then the sparse ones, with their weights.

The compiled backends compute one row per program in one pass: softmax statistics, the loss and --
when the student requires grad -- the gradient, written while the row is in cache. Per-row weights
that depend on the whole batch (``1/|R_k|``) are computed before the kernel from labels (and, for
guided KD, the teachers' argmax) with a few small tensor ops, so the gradient is final when written
and the backward only rescales it by ``grad_output``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .. import _C, backends
from .._inputs import (
    as_rows3d,
    check_choice,
    check_float_tensor,
    check_real,
    check_same_device,
    check_weights,
    weights_for,
)
from ..ops import OnePassLoss
from ..sparse import SparseTeacher

REDUCTIONS = ("batchmean", "sum", "mean", "none")
# The divergences, in the order of the kernels' codes (fastkd::Divergence in csrc/kd_loss.h).
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")

# Whether each compiled backend's kd_loss op takes sparse teachers (fastkd.SparseTeacher): None
# when it does, else why not. The one switch to flip when a backend's kernel implements them
# (the "torch" backend always does: it densifies).
SPARSE_SUPPORT: dict[str, str | None] = {
    "cpu": None,
    "cuda": None,
    "triton": None,
}


def kd_loss(
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
    backend: str = "auto",
) -> torch.Tensor:
    """Knowledge-distillation loss ``T^2 KL(softmax(t/T) || softmax(s/T))``, optionally mixed
    with hard-label cross-entropy, guided (GKD) and summed over a teacher cohort; the KL may be
    replaced by reverse KL or the generalised Jensen-Shannon divergence (on-policy LM
    distillation).

    Args:
        student_logits: ``[..., C]`` float32/bfloat16/float16 (float64 on CPU) logits.
        teacher_logits: a tensor of the student's shape, a `fastkd.SparseTeacher` (the
            teacher's top-k classes per row: ``[..., k]`` ids and values, see its docstring for
            the dense teacher it stands for), or a list/tuple mixing them (a cohort, e.g. DIH's
            intermediate heads plus the teacher), any float dtype. Never differentiated.
        labels: integer class indices of shape ``student_logits.shape[:-1]``; needed for
            ``alpha``, ``guided`` and ``ignore_index``. A label outside ``[0, C)`` other than
            ``ignore_index`` raises on the CPU; on a GPU, where raising would need a host sync,
            it makes the whole loss NaN (every row with ``reduction="none"``).
        temperature: ``T > 0``.
        alpha: weight of the KD term; ``1 - alpha`` weighs cross-entropy at ``T = 1``.
            ``None``: KD alone.
        label_smoothing: ``eps`` of the CE target (needs ``alpha``).
        guided: count a teacher's KD term only on rows it classifies correctly.
        ignore_index: label value whose rows count nowhere.
        teacher_weights: one non-negative weight per teacher (default all 1.0).
        reduction: ``"batchmean"`` (default), ``"sum"``, ``"mean"`` or ``"none"``.
        divergence: ``"forward_kl"`` (default) ``KL(p || q)``, ``"reverse_kl"`` ``KL(q || p)``,
            or ``"jsd"``: ``beta KL(p || m) + (1 - beta) KL(q || m)`` with
            ``m = beta p + (1 - beta) q`` (``p`` the teacher's and ``q`` the student's softmax at
            ``T``), each times ``T^2``. ``"jsd"`` is TRL's ``generalized_jsd_loss`` (and
            Liger-Kernel's JSD) for ``0 < beta < 1``, which omit the ``T^2``: divide by ``T^2`` to
            compare. Reverse KL is infinite where the teacher gives probability 0 to a class the
            student does not, so a sparse teacher with ``tail="none"`` is refused with it.
        beta: the JSD's mixing weight, in ``(0, 1)`` (its limits are the KLs: use
            ``divergence="forward_kl"`` or ``"reverse_kl"`` for them); read only by ``"jsd"``.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``.

    Returns:
        A float32 scalar (float64 for float64 inputs), or per-row values of shape
        ``student_logits.shape[:-1]`` for ``reduction="none"``.
    """
    options = _check_options(
        temperature=temperature, alpha=alpha, label_smoothing=label_smoothing, guided=guided,
        ignore_index=ignore_index, teacher_weights=teacher_weights, reduction=reduction,
        divergence=divergence, beta=beta, backend=backend,
    )
    return _kd_loss(student_logits, teacher_logits, labels, **options)


def _check_options(
    *,
    temperature: float,
    alpha: float | None,
    label_smoothing: float,
    guided: bool,
    ignore_index: int,
    teacher_weights: Sequence[float] | None,
    reduction: str,
    divergence: str,
    beta: float,
    backend: str,
) -> dict:
    """The keyword arguments of `kd_loss`, checked, as `_kd_loss` takes them (the teacher
    weights' count is checked against the teachers at each call)."""
    temperature = check_real(temperature, "temperature", low=0.0, low_open=True)
    if alpha is not None:
        alpha = check_real(alpha, "alpha", low=0.0, high=1.0)
    label_smoothing = check_real(label_smoothing, "label_smoothing", low=0.0, high=1.0)
    if label_smoothing != 0 and alpha is None:
        raise ValueError(
            "label_smoothing applies to the cross-entropy term, which needs alpha (got alpha=None)"
        )
    if not isinstance(guided, bool):
        raise TypeError(f"guided must be a bool, got {type(guided).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    divergence = check_choice(divergence, "divergence", DIVERGENCES)
    beta = check_real(beta, "beta", low=0.0, low_open=True)
    if beta >= 1.0:
        raise ValueError(
            f"beta must be < 1, got {beta} (the limits beta -> 0 and 1 of the JSD are the KLs: "
            "use divergence='forward_kl' or 'reverse_kl')"
        )
    return {
        "temperature": temperature,
        "alpha": alpha,
        "label_smoothing": label_smoothing,
        "guided": guided,
        "ignore_index": ignore_index,
        "teacher_weights": check_weights(teacher_weights, "teacher_weights"),
        "reduction": check_choice(reduction, "reduction", REDUCTIONS),
        "divergence": divergence,
        "beta": beta,
        "backend": check_choice(backend, "backend", backends.CHOICES),
    }


def _kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | SparseTeacher | Sequence[torch.Tensor | SparseTeacher],
    labels: torch.Tensor | None,
    *,
    temperature: float,
    alpha: float | None,
    label_smoothing: float,
    guided: bool,
    ignore_index: int,
    teacher_weights: list[float] | None,
    reduction: str,
    divergence: str,
    beta: float,
    backend: str,
) -> torch.Tensor:
    """`kd_loss` with keyword arguments that `_check_options` returned (``fastkd.nn.KDLoss``
    checks them once, when it is built); the tensors are checked here."""
    student, teachers, labels = _check_tensors(
        student_logits, teacher_logits, labels, alpha, guided
    )
    weights = weights_for(teacher_weights, len(teachers), "teacher_weights", "teacher")
    classes = student.shape[-1]
    sparse_teachers = [t for t in teachers if isinstance(t, SparseTeacher)]
    if divergence == "reverse_kl":
        _refuse_zero_tails(sparse_teachers, classes, len(teachers))
    chosen = _choose_backend(student, teachers, backend)
    if chosen == "torch":
        from ..reference import kd_loss_ref

        loss = kd_loss_ref(
            student, teachers, labels, temperature=temperature, alpha=alpha,
            label_smoothing=label_smoothing, guided=guided, ignore_index=ignore_index,
            teacher_weights=weights, reduction=reduction, divergence=divergence, beta=beta,
        )
        return _nan_if_out_of_range(
            loss, labels, classes, ignore_index, [t.indices for t in sparse_teachers]
        )

    s3 = as_rows3d(student)
    # The kernels take the dense teachers first, then the sparse ones (csrc/kd_loss.h); the
    # weights follow their teachers.
    pairs = list(zip(teachers, weights, strict=True))
    dense = [(t, w) for t, w in pairs if isinstance(t, torch.Tensor)]
    sparse = [(t, w) for t, w in pairs if isinstance(t, SparseTeacher)]
    # Detached: the teacher is never differentiated, and a teacher that requires grad must not
    # make the loss of a frozen student differentiable (its backward has no gradient to scale).
    t3 = [as_rows3d(t.detach()) for t, _ in dense]
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    ids, values, tails = [], [], []
    for t, _ in sparse:
        i, v, tl = t._for_kernel(classes, acc)
        ids.append(i)
        values.append(v)
        tails.append(tl)
    # The kernels read labels as a dense int64 vector; reshape(-1) keeps a 1-D slice's stride.
    y = None if labels is None else labels.reshape(-1).to(torch.int64).contiguous()
    argmax = None
    if guided:
        argmax = [t.argmax(-1).reshape(-1) for t in t3] + [
            _sparse_argmax(i, v, tl, classes) for i, v, tl in zip(ids, values, tails, strict=True)
        ]
    kd_coefs, ce_coef, kd_row_weights, ce_row_weights = _plan(
        s3, argmax, len(teachers), y, temperature, alpha, ignore_index,
        [w for _, w in dense + sparse], reduction,
    )
    if chosen == "triton":
        op, scale = torch.ops.fastkd.kd_loss_fwd_triton, torch.ops.fastkd.scale_grad_triton_
    else:
        op, scale = torch.ops.fastkd.kd_loss_fwd, torch.ops.fastkd.scale_grad_
    # The sparse teachers' ids, values and tails follow compute_grad in the op's schema, which
    # OnePassLoss appends to `args`: they are bound by name.
    fwd = functools.partial(
        op, sparse_ids=ids, sparse_values=values, sparse_tails=tails,
        divergence=DIVERGENCES.index(divergence), beta=float(beta),
    )
    args = (
        t3, y, kd_row_weights, ce_row_weights, kd_coefs, ce_coef, float(temperature),
        float(label_smoothing), int(ignore_index), reduction == "none",
    )
    if torch.is_grad_enabled() and student.requires_grad:
        loss = OnePassLoss.apply(s3, fwd, scale, *args)
    else:
        loss, _ = fwd(s3, *args, False)
    if reduction == "none":
        loss = loss.view(student.shape[:-1])
    return _nan_if_out_of_range(loss, labels, classes, ignore_index, ids)


def _refuse_zero_tails(sparse_teachers: list[SparseTeacher], classes: int, count: int) -> None:
    """Reverse KL sums q log(q / p) over every class: a sparse teacher whose tail has probability
    0 (``tail="none"``) makes it infinite wherever the student puts mass outside the k classes."""
    for t in sparse_teachers:
        if t.tail == "none" and t.k < classes:
            which = "teacher_logits" if count == 1 else "a SparseTeacher in teacher_logits"
            raise ValueError(
                f"divergence='reverse_kl' is infinite against {which} with tail='none' "
                "(probability 0 outside its k classes, where the student's is positive): give it "
                "tail='uniform' (values as log_probs or probs), or use 'forward_kl' or 'jsd'"
            )


def _nan_if_out_of_range(
    loss: torch.Tensor,
    labels: torch.Tensor | None,
    classes: int,
    ignore_index: int,
    ids: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """On a GPU, a label outside [0, C) that is not ignore_index, or a sparse teacher's class id
    outside [0, C), cannot raise without a host sync: it turns the whole loss NaN (every row with
    reduction="none"), with every option, so a training loop's NaN check stops on it. The CPU
    backends raise instead (the check is free there). A few element-wise ops over the labels and
    ids, on the device, no sync."""
    if loss.device.type == "cpu" or (labels is None and not ids):
        return loss
    flags = [((i < 0) | (i >= classes)).any() for i in ids]
    if labels is not None:
        flags.append(((labels != ignore_index) & ((labels < 0) | (labels >= classes))).any())
    bad = flags[0]
    for flag in flags[1:]:
        bad = bad | flag
    return loss + torch.where(bad, float("nan"), 0.0)


def _check_tensors(student, teacher_logits, labels, alpha, guided):
    student = check_float_tensor(student, "student_logits")
    teachers = _teacher_list(teacher_logits)
    if student.dim() == 0:
        raise ValueError("student_logits must have a class dimension, got a 0-d tensor")
    for i, t in enumerate(teachers):
        name = "teacher_logits" if len(teachers) == 1 else f"teacher_logits[{i}]"
        if isinstance(t, SparseTeacher):
            _check_sparse(student, t, name)
            continue
        check_float_tensor(t, name)
        check_same_device(student, t, name, "student_logits")
        if t.shape != student.shape:
            what = "class count" if t.shape[:-1] == student.shape[:-1] else "shape"
            raise ValueError(
                f"{name} must have the student's shape {tuple(student.shape)}, got "
                f"{tuple(t.shape)} (mismatched {what})"
            )
    if student.numel() == 0:
        raise ValueError(
            f"student_logits must hold at least one row and one class, got shape "
            f"{tuple(student.shape)} (empty batch)"
        )
    if labels is None:
        if alpha is not None:
            raise ValueError("alpha mixes in cross-entropy on hard labels: pass labels")
        if guided:
            raise ValueError("guided=True compares the teacher's argmax with labels: pass labels")
    else:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"labels must be an int64 or int32 tensor, got {labels.dtype}")
        if labels.shape != student.shape[:-1]:
            raise ValueError(
                f"labels must have shape {tuple(student.shape[:-1])} (the logits' leading dims), "
                f"got {tuple(labels.shape)}"
            )
        check_same_device(student, labels, "labels", "student_logits")
    dense = [t for t in teachers if isinstance(t, torch.Tensor)]
    mixed64 = {t.dtype == torch.float64 for t in [student, *dense]}
    if len(mixed64) > 1:
        raise TypeError(
            "float64 logits must be float64 for student_logits and teacher_logits alike, got "
            f"{student.dtype} and {', '.join(str(t.dtype) for t in dense)}"
        )
    if dense:
        common = dense[0].dtype
        for t in dense[1:]:
            common = torch.promote_types(common, t.dtype)
        # A cohort in mixed dtypes runs in its common dtype (a copy of the odd ones only).
        teachers = [
            t if isinstance(t, SparseTeacher) or t.dtype == common else t.to(common)
            for t in teachers
        ]
    return student, teachers, labels


def _teacher_list(teacher_logits: object) -> list[torch.Tensor | SparseTeacher]:
    """A tensor, a SparseTeacher, or a non-empty list/tuple mixing them, as a list."""
    if isinstance(teacher_logits, (torch.Tensor, SparseTeacher)):
        return [teacher_logits]
    if not isinstance(teacher_logits, (list, tuple)):
        raise TypeError(
            "teacher_logits must be a tensor or a list/tuple of tensors (a fastkd.SparseTeacher "
            f"stands for a tensor), got {type(teacher_logits).__name__}"
        )
    if len(teacher_logits) == 0:
        raise ValueError("teacher_logits must not be an empty list")
    for i, t in enumerate(teacher_logits):
        if not isinstance(t, (torch.Tensor, SparseTeacher)):
            raise TypeError(
                f"teacher_logits[{i}] must be a torch.Tensor or a fastkd.SparseTeacher, got "
                f"{type(t).__name__}"
            )
    return list(teacher_logits)


def _check_sparse(student: torch.Tensor, t: SparseTeacher, name: str) -> None:
    """What a SparseTeacher's own checks could not know: the student's device, rows and classes
    (its ids' values are checked by the backends, as labels are)."""
    check_same_device(student, t.values, f"{name}.values", "student_logits")
    if t.shape != student.shape[:-1]:
        raise ValueError(
            f"{name}.indices and .values must have the student's leading dims "
            f"{tuple(student.shape[:-1])} and k classes last, got {tuple(t.indices.shape)}"
        )
    classes = student.shape[-1]
    if t.k > classes:
        raise ValueError(
            f"{name} holds k = {t.k} classes per row, more than the student's {classes}"
        )


def _sparse_argmax(
    ids: torch.Tensor, values: torch.Tensor, tails: torch.Tensor, classes: int
) -> torch.Tensor:
    """Per row, the argmax of the dense teacher a sparse one stands for (the lowest class on ties),
    from its kernel inputs (`SparseTeacher._for_kernel`), in O(k) per row: the lowest id whose
    value is the maximum, or, when the tail constant is the maximum, the lowest class not among
    the ids (the first gap in the sorted ids), whichever is lower."""
    k = ids.shape[1]
    best = torch.maximum(values.amax(-1), tails)
    lowest = torch.where(values == best[:, None], ids, classes).amin(-1).long()
    if k < classes:
        ordered = ids.sort(-1).values
        gap = ordered != torch.arange(k, dtype=ids.dtype, device=ids.device)
        # Distinct sorted ids satisfy ordered[j] >= j; the first j with ordered[j] != j is absent.
        missing = torch.where(gap.any(-1), gap.to(torch.int8).argmax(-1), k)
        lowest = torch.minimum(lowest, torch.where(tails == best, missing, classes))
    return lowest


def _choose_backend(
    student: torch.Tensor, teachers: Sequence[torch.Tensor | SparseTeacher], requested: str
) -> str:
    k = len(teachers)
    f64 = student.dtype == torch.float64
    sparse = any(isinstance(t, SparseTeacher) for t in teachers)

    def reasons(backend: str):
        def reason() -> str | None:
            if backend != "cpu" and f64:
                return "float64 runs on the CPU backend only"
            if k > _C.max_teachers:
                return f"{k} teachers; the kernels take at most {_C.max_teachers}"
            return SPARSE_SUPPORT[backend] if sparse else None

        return reason

    return backends.choose(
        "kd_loss",
        requested,
        student.device,
        {b: reasons(b) for b in ("cpu", "cuda", "triton")},
        dtype=student.dtype,
        size=student.shape[-1],
    )


def _plan(
    s3: torch.Tensor,
    argmax: list[torch.Tensor] | None,
    teachers: int,
    labels: torch.Tensor | None,
    temperature: float,
    alpha: float | None,
    ignore_index: int,
    weights: list[float],
    reduction: str,
) -> tuple[list[float], float, torch.Tensor | None, torch.Tensor | None]:
    """The kernel's coefficients: kd_coefs[k] * kd_row_weights[k, b] is teacher k's gradient
    weight on row b, ce_coef * ce_row_weights[b] the CE weight (see csrc/kd_loss.h). Teachers and
    `weights` are in the kernel's order; `argmax` holds each teacher's argmax per row for guided
    KD (None: not guided)."""
    rows, classes = s3.shape[0] * s3.shape[1], s3.shape[2]
    normalise = reduction in ("batchmean", "mean")
    kd_scale = (1.0 if alpha is None else float(alpha)) * float(temperature)
    if reduction == "mean":
        kd_scale /= classes
    kd_coefs = [kd_scale * w for w in weights]
    ce_coef = 0.0 if alpha is None else 1.0 - float(alpha)
    if labels is None:
        if normalise:
            kd_coefs = [c / rows for c in kd_coefs]
        return kd_coefs, ce_coef, None, None

    # Row weights in the kernels' accumulation dtype.
    dtype = torch.float64 if s3.dtype == torch.float64 else torch.float32
    counted = labels != ignore_index
    ce_row_weights = counted.to(dtype)
    if normalise:
        ce_row_weights = ce_row_weights / counted.sum().clamp_min(1)
    if argmax is not None:
        hits = torch.stack([a == labels for a in argmax]) & counted
        kd_row_weights = hits.to(dtype)
        if normalise:
            kd_row_weights = kd_row_weights / hits.sum(1, keepdim=True).clamp_min(1)
    else:
        kd_row_weights = ce_row_weights.expand(teachers, rows)
    return kd_coefs, ce_coef, kd_row_weights, (ce_row_weights if ce_coef != 0.0 else None)
