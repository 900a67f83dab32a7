"""``fastkd.linear_kd_loss``: knowledge distillation through a language model's output head, fused.

For student hidden states ``h`` ``[..., H]``, head weight ``W`` ``[C, H]`` and bias ``b``::

    linear_kd_loss(h, W, teacher, labels, student_bias=b, ...)
        == kd_loss(h @ W.T + b, teacher_logits, labels, ...)

in value and in the gradients of ``h``, ``W`` and ``b``, where ``teacher_logits`` is the teacher
tensor itself, the dense teacher a `fastkd.SparseTeacher` stands for, or, for a
`fastkd.LinearTeacher`, ``t_hidden @ t_weight.T + t_bias``.

The rows (the leading dims of ``h`` flattened, ``N`` of them) are processed in chunks of
``chunk_size`` rows. Per chunk: the student's logits by one matmul (``addmm``; bf16/fp16 weights
multiply with float32 accumulation), the teacher's likewise for a `LinearTeacher` (a dense or
sparse teacher is sliced), one call of the fused KD kernel (``fastkd::kd_loss_fwd``) that returns
the chunk's loss and the gradient of its logits, then that gradient carried to the hidden states
(``g @ W``), the weight (``W.grad += g.T @ h``, one in-place ``addmm_`` per chunk) and the bias
(``g.sum(0)``, summed in float32). The chunks' logits reuse two ``[chunk_size, C]`` buffers; each
chunk's gradient is freed before the next chunk.
Neither model's ``[N, C]`` logits ever exist: the extra memory is ``O(chunk_size * C)`` plus the
gradients themselves. The kernel's coefficients and per-row weights (``1 / |counted rows|``) are
planned once for all ``N`` rows, so ``"batchmean"`` normalises by the whole batch, exactly as the
unfused composition.

As fastkd's other losses, the gradients are computed in the forward pass (while the chunk's logits
exist) and the backward only scales them in place by ``grad_output`` (``fastkd::scale_grads_``;
nothing at all, and no host sync, when ``grad_output`` is exactly 1). A second backward through
the same graph is refused. Only the gradients that are needed are computed.

The chunk loop is a custom op, ``fastkd::linear_kd_loss_fwd`` (``torch.library.custom_op`` with a
fake implementation), so ``torch.compile(fullgraph=True)`` traces a call as one opaque op and
``opcheck`` applies to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._inputs import check_float_tensor, check_same_device
from ..linear_teacher import LinearTeacher
from ..ops import OnePassGroupLoss
from ..sparse import SparseTeacher
from .kd_loss import (
    DIVERGENCES,
    _check_options,
    _choose_backend,
    _nan_if_out_of_range,
    _plan,
    _refuse_zero_tails,
)

# chunk_size=None: the rows whose [chunk, C] logits hold 4x as many elements as the [N, H] hidden
# states, rounded down to a multiple of _CHUNK_ALIGN and clamped to [_MIN_CHUNK, _MAX_CHUNK], at
# most N. Each chunk reads and writes the whole weight gradient once (its in-place addmm_), so
# fewer, larger chunks are faster (on the CPU at fp32, 1024-row chunks took about 10 % less time
# than 256-row ones at N = 2048, H = 1024, C = 32000); above _MAX_CHUNK a chunk only adds memory.
_CHUNK_ELEMENTS = 4
_MIN_CHUNK = 256
_MAX_CHUNK = 1024
_CHUNK_ALIGN = 256


def default_chunk_size(rows: int, hidden: int, classes: int) -> int:
    """The ``chunk_size`` that ``chunk_size=None`` picks for ``rows`` (N) rows of ``hidden`` (H)
    features and ``classes`` (C) classes: ``min(N, clamp(floor(4 * N * H / C / 256) * 256, 256,
    1024))``. Each of the chunk's ``[chunk, C]`` buffers (student logits, teacher logits, their
    gradient) then holds about 4x as many elements as the hidden states, within 256 to 1024
    rows."""
    target = _CHUNK_ELEMENTS * rows * hidden // max(classes, 1) // _CHUNK_ALIGN * _CHUNK_ALIGN
    return max(1, min(rows, _MAX_CHUNK, max(_MIN_CHUNK, target)))


def linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: torch.Tensor | SparseTeacher | LinearTeacher,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    alpha: float | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    reduction: str = "batchmean",
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """`fastkd.kd_loss` of the logits ``student_hidden @ student_weight.T + student_bias`` without
    storing them: the head's matmul and the fused KD kernel run together over chunks of rows.

    Same value and gradients (of the hidden states, the weight and the bias) as
    ``fastkd.kd_loss(student_hidden @ student_weight.T + student_bias, teacher_logits, labels,
    ...)``; see `fastkd.kd_loss` for the loss and its options.

    Args:
        student_hidden: ``[..., H]`` float32/bfloat16/float16 (float64 on the CPU) hidden states,
            e.g. ``[B, L, H]`` for a language model.
        student_weight: ``[C, H]`` head weight, in ``student_hidden``'s dtype (bf16/fp16 weights
            multiply with float32 accumulation inside each matmul; the weight's gradient is
            summed over chunks in place, in its dtype, so a bf16 gradient is rounded once per
            chunk, as Liger-Kernel's chunked losses do).
        teacher: dense teacher logits ``[..., C]`` (the hidden states' leading dims), a
            `fastkd.SparseTeacher` (its top-k classes per row) or a `fastkd.LinearTeacher`
            (``hidden [..., H_t]``, ``weight [C, H_t]``, optional bias: the teacher's head runs
            chunk by chunk too). One teacher: cohorts (lists) are refused, use `fastkd.kd_loss`.
            Never differentiated.
        labels: integer class ids of shape ``student_hidden.shape[:-1]``; needed for ``alpha``
            and ``ignore_index``.
        student_bias: optional ``[C]`` head bias, in the weight's dtype.
        temperature, alpha, label_smoothing, ignore_index, divergence, beta: as in
            `fastkd.kd_loss`.
        reduction: ``"batchmean"`` (default), ``"sum"`` or ``"mean"``. ``"none"`` is refused:
            per-row losses would need each row's gradient scaled in the backward, i.e. the
            ``[N, C]`` logit gradient kept or recomputed.
        chunk_size: rows per chunk; ``None`` picks ``default_chunk_size(N, H, C)`` =
            ``min(N, clamp(floor(4 * N * H / C / 256) * 256, 256, 1024))``: each
            ``[chunk, C]`` buffer about 4x the hidden states' size, within 256 to 1024 rows.
            Any positive value gives the same loss up to float rounding; larger chunks use more
            memory (three ``[chunk, C]`` buffers at a time).
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"`` (the fused
            kernel on each chunk's logits; ``"torch"`` runs the plain-PyTorch reference per chunk
            instead, with autograd for the chunk's gradient).

    Guided KD (``guided=True``) and teacher cohorts are not offered here: guided KD needs every
    teacher row's argmax before the first chunk's coefficients, which a `LinearTeacher` would have
    to compute in an extra pass over its head.

    Returns:
        A float32 scalar (float64 for float64 inputs).
    """
    options = _check_options(
        temperature=temperature, alpha=alpha, label_smoothing=label_smoothing, guided=False,
        ignore_index=ignore_index, teacher_weights=None, reduction=reduction,
        divergence=divergence, beta=beta, backend=backend,
    )
    return _linear_kd_loss(
        student_hidden, student_weight, teacher, labels, student_bias=student_bias,
        chunk_size=chunk_size, **options,
    )


def _check_chunk_size(chunk_size: object) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def _check_head(hidden, weight, bias):
    hidden = check_float_tensor(hidden, "student_hidden")
    if hidden.dim() == 0:
        raise ValueError("student_hidden must be [..., H], got a 0-d tensor")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"student_weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(
            f"student_weight must be 2-D [C, H], got shape {tuple(weight.shape)}"
        )
    check_float_tensor(weight, "student_weight")
    check_same_device(hidden, weight, "student_weight", "student_hidden")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"student_hidden has H = {hidden.shape[-1]} features but student_weight "
            f"{tuple(weight.shape)} takes {weight.shape[1]} (mismatched H)"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"student_weight must have student_hidden's dtype {hidden.dtype}, got {weight.dtype}"
        )
    if weight.shape[0] == 0:
        raise ValueError("student_weight must have at least one class (C = 0)")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"student_bias must be a torch.Tensor, got {type(bias).__name__}")
        check_same_device(hidden, bias, "student_bias", "student_hidden")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"student_bias must have shape ({weight.shape[0]},) (student_weight's C), got "
                f"{tuple(bias.shape)} (mismatched C)"
            )
        if bias.dtype != weight.dtype:
            raise TypeError(
                f"student_bias must have student_weight's dtype {weight.dtype}, got {bias.dtype}"
            )
    if hidden.numel() == 0:
        raise ValueError(
            f"student_hidden must hold at least one row, got shape {tuple(hidden.shape)} "
            "(empty batch)"
        )
    return hidden


def _check_teacher(teacher, lead, classes, hidden):
    if isinstance(teacher, (list, tuple)):
        raise TypeError(
            "linear_kd_loss takes one teacher (a tensor, a SparseTeacher or a LinearTeacher); "
            "teacher cohorts are not supported here, use fastkd.kd_loss on materialised logits"
        )
    f64 = hidden.dtype == torch.float64
    if isinstance(teacher, torch.Tensor):
        check_float_tensor(teacher, "teacher")
        check_same_device(hidden, teacher, "teacher", "student_hidden")
        expected = (*lead, classes)
        if tuple(teacher.shape) != expected:
            what = "class count" if tuple(teacher.shape[:-1]) == tuple(lead) else "leading dims"
            raise ValueError(
                f"teacher logits must have shape {expected} (student_hidden's leading dims and "
                f"student_weight's C), got {tuple(teacher.shape)} (mismatched {what})"
            )
        dtype = teacher.dtype
    elif isinstance(teacher, SparseTeacher):
        check_same_device(hidden, teacher.values, "teacher.values", "student_hidden")
        if tuple(teacher.shape) != tuple(lead):
            raise ValueError(
                f"teacher.indices and .values must have student_hidden's leading dims "
                f"{tuple(lead)} and k classes last, got {tuple(teacher.indices.shape)} "
                "(mismatched leading dims)"
            )
        if teacher.k > classes:
            raise ValueError(
                f"teacher holds k = {teacher.k} classes per row, more than student_weight's "
                f"C = {classes}"
            )
        return
    elif isinstance(teacher, LinearTeacher):
        check_same_device(hidden, teacher.hidden, "teacher.hidden", "student_hidden")
        if tuple(teacher.shape) != tuple(lead):
            raise ValueError(
                f"teacher.hidden must have student_hidden's leading dims {tuple(lead)}, got "
                f"shape {tuple(teacher.hidden.shape)} (mismatched leading dims)"
            )
        if teacher.classes != classes:
            raise ValueError(
                f"teacher.weight has C = {teacher.classes} classes but student_weight has "
                f"{classes} (mismatched C)"
            )
        dtype = teacher.hidden.dtype
    else:
        raise TypeError(
            "teacher must be a tensor of logits, a fastkd.SparseTeacher or a "
            f"fastkd.LinearTeacher, got {type(teacher).__name__}"
        )
    if (dtype == torch.float64) != f64:
        raise TypeError(
            "float64 must be the dtype of the student and the teacher alike, got "
            f"{hidden.dtype} and {dtype}"
        )


def _check_labels(labels, lead, hidden, alpha):
    if labels is None:
        if alpha is not None:
            raise ValueError("alpha mixes in cross-entropy on hard labels: pass labels")
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 or int32 tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead):
        raise ValueError(
            f"labels must have shape {tuple(lead)} (student_hidden's leading dims), got "
            f"{tuple(labels.shape)}"
        )
    check_same_device(hidden, labels, "labels", "student_hidden")
    return labels.reshape(-1).to(torch.int64).contiguous()


def _linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: torch.Tensor | SparseTeacher | LinearTeacher,
    labels: torch.Tensor | None,
    *,
    student_bias: torch.Tensor | None,
    chunk_size: int | None,
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
    """`linear_kd_loss` with options that `_check_options` returned (`fastkd.nn.LinearKDLoss`
    checks them once); the tensors and ``chunk_size`` are checked here."""
    if guided:
        raise ValueError(
            "guided=True is not supported by linear_kd_loss (it needs every teacher row's argmax "
            "before the first chunk); use fastkd.kd_loss on materialised logits"
        )
    if teacher_weights is not None:
        raise ValueError("teacher_weights weigh a cohort; linear_kd_loss takes one teacher")
    if reduction == "none":
        raise ValueError(
            "reduction='none' is not supported by linear_kd_loss: per-row losses need each row's "
            "gradient scaled in the backward, i.e. the [N, C] logit gradient kept; use "
            "'batchmean', 'sum' or 'mean'"
        )
    chunk_size = _check_chunk_size(chunk_size)
    hidden = _check_head(student_hidden, student_weight, student_bias)
    weight, bias = student_weight, student_bias
    lead = hidden.shape[:-1]
    classes, features = weight.shape
    _check_teacher(teacher, lead, classes, hidden)
    y = _check_labels(labels, lead, hidden, alpha)
    rows = hidden.numel() // features
    if chunk_size is None:
        chunk_size = default_chunk_size(rows, features, classes)
    if divergence == "reverse_kl" and isinstance(teacher, SparseTeacher):
        _refuse_zero_tails([teacher], classes, 1)

    dtype = weight.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    stub = hidden.new_empty((0, classes), dtype=dtype)
    chosen = _choose_backend(
        stub, [teacher if isinstance(teacher, SparseTeacher) else stub], backend
    )
    # The kernel's coefficients and row weights for all N rows at once (only the shape and dtype
    # of the logits are read): batchmean divides by the whole batch's counted rows.
    shape_only = torch.empty((), dtype=dtype, device=hidden.device).expand(1, rows, classes)
    kd_coefs, ce_coef, kd_row_weights, ce_row_weights = _plan(
        shape_only, None, 1, y, temperature, alpha, ignore_index, [1.0], reduction
    )
    if kd_row_weights is not None:
        kd_row_weights = kd_row_weights.contiguous()

    t_hidden = t_weight = t_bias = t_logits = ids = values = tails = None
    if isinstance(teacher, LinearTeacher):
        t_hidden = teacher.hidden.detach().reshape(rows, -1)
        t_weight = teacher.weight.detach()
        t_bias = None if teacher.bias is None else teacher.bias.detach()
    elif isinstance(teacher, SparseTeacher):
        ids, values, tails = teacher._for_kernel(classes, acc)
    else:
        t_logits = teacher.detach().reshape(rows, classes)
        if classes > 1 and t_logits.stride(-1) != 1:
            t_logits = t_logits.contiguous()

    h2 = hidden.reshape(rows, features)
    students = [h2, weight] + ([] if bias is None else [bias])
    args = (
        t_hidden, t_weight, t_bias, t_logits, ids, values, tails, y, kd_row_weights,
        ce_row_weights, float(kd_coefs[0]), float(ce_coef), float(temperature),
        float(label_smoothing), int(ignore_index), DIVERGENCES.index(divergence), float(beta),
        int(chunk_size), chosen,
    )
    has_bias = bias is not None

    def fwd(students, *args_and_flags):
        *op_args, flags = args_and_flags
        full = list(flags) + ([] if has_bias else [False])
        # The "torch" backend differentiates each chunk with autograd, which a custom op's
        # implementation runs below (autograd is off there): it calls the loop directly.
        run = _chunk_loop if chosen == "torch" else torch.ops.fastkd.linear_kd_loss_fwd
        loss, gh, gw, gb = run(
            students[0], students[1], students[2] if has_bias else None, *op_args, full
        )
        return loss, [gh, gw, gb][: len(students)]

    flags = [torch.is_grad_enabled() and s.requires_grad for s in students]
    if any(flags):
        scale = (
            torch.ops.fastkd.scale_grads_triton_ if chosen == "triton"
            else torch.ops.fastkd.scale_grads_
        )
        loss = OnePassGroupLoss.apply(fwd, scale, args, flags, *students)
    else:
        loss, _ = fwd(students, *args, flags)
    return _nan_if_out_of_range(
        loss, y, classes, ignore_index, [] if ids is None else [ids]
    )


def _chunk_loop(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    sparse_ids: torch.Tensor | None,
    sparse_values: torch.Tensor | None,
    sparse_tails: torch.Tensor | None,
    labels: torch.Tensor | None,
    kd_row_weights: torch.Tensor | None,
    ce_row_weights: torch.Tensor | None,
    kd_coef: float,
    ce_coef: float,
    temperature: float,
    label_smoothing: float,
    ignore_index: int,
    divergence: int,
    beta: float,
    chunk_size: int,
    backend: str,
    compute_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk loop: ``(loss, grad_hidden, grad_weight, grad_bias)`` for ``hidden [N, H]``,
    ``weight [C, H]``, ``bias [C]`` and one teacher (``teacher_hidden/weight/bias``: a linear
    head; ``teacher_logits [N, C]``; or ``sparse_ids/values/tails``, the kernel form of a
    SparseTeacher), with the kd_loss kernel's coefficients and row weights ``[1, N]`` / ``[N]``
    planned for all N rows. A gradient whose ``compute_grad`` flag (hidden, weight, bias) is
    false is an empty ``[0]`` tensor."""
    rows, features = hidden.shape
    classes = weight.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    want_h, want_w, want_b = compute_grad
    want_b = want_b and bias is not None
    want = want_h or want_w or want_b
    grad_h = torch.empty_like(hidden) if want_h else hidden.new_empty((0,))
    # The weight's gradient is accumulated in place, in its dtype: each chunk's g.T @ h runs as
    # one addmm_ (float32 accumulation inside the matmul, for bf16/fp16 too), so a bf16 sum is
    # rounded to bf16 once per chunk. A float32 accumulator would add 2 x |W| bytes (4/3 of a
    # bf16 weight's size more, with the final cast) and an extra pass over it per chunk: CPU
    # matmuls do not take a float32 output for bf16 operands.
    grad_w = torch.empty_like(weight) if want_w else weight.new_empty((0,))
    grad_b_acc = weight.new_zeros((classes,), dtype=acc) if want_b else None
    loss = hidden.new_zeros((), dtype=acc)
    wt = weight.t()
    # The chunk's logits are written into two buffers allocated once: a fresh [chunk, C] tensor
    # per chunk would be a fresh mmap (above glibc's 32 MiB threshold) whose pages fault in again.
    span = min(chunk_size, rows)
    s_buf = weight.new_empty((span, classes))
    t_buf = None if teacher_weight is None else teacher_weight.new_empty((span, classes))
    for start in range(0, rows, chunk_size):
        end = min(rows, start + chunk_size)
        h = hidden[start:end]
        logits = s_buf[: end - start]
        if bias is not None:
            torch.addmm(bias, h, wt, out=logits)
        else:
            torch.mm(h, wt, out=logits)
        if teacher_weight is not None:
            th = teacher_hidden[start:end]
            t = t_buf[: end - start]
            if teacher_bias is not None:
                torch.addmm(teacher_bias, th, teacher_weight.t(), out=t)
            else:
                torch.mm(th, teacher_weight.t(), out=t)
        elif teacher_logits is not None:
            t = teacher_logits[start:end]
        else:
            t = None
        sparse = None if sparse_ids is None else (
            sparse_ids[start:end], sparse_values[start:end], sparse_tails[start:end]
        )
        kd_w = None if kd_row_weights is None else kd_row_weights[:, start:end]
        ce_w = None if ce_row_weights is None else ce_row_weights[start:end]
        y = None if labels is None else labels[start:end]
        chunk_loss, g = _chunk(
            backend, logits, t, sparse, y, kd_w, ce_w, kd_coef, ce_coef, temperature,
            label_smoothing, ignore_index, divergence, beta, want,
        )
        del logits, t
        loss += chunk_loss
        if not want:
            continue
        if want_h:
            torch.mm(g, weight, out=grad_h[start:end])
        if want_w:
            if start == 0:
                torch.mm(g.t(), h, out=grad_w)
            else:
                grad_w.addmm_(g.t(), h)
        if want_b:
            grad_b_acc += g.sum(0, dtype=acc)
        del g
    grad_b = (
        (grad_b_acc if grad_b_acc.dtype == bias.dtype else grad_b_acc.to(bias.dtype))
        if want_b else hidden.new_empty((0,))
    )
    return loss, grad_h, grad_w, grad_b


linear_kd_loss_fwd = torch.library.custom_op(
    "fastkd::linear_kd_loss_fwd", _chunk_loop, mutates_args=()
)


@linear_kd_loss_fwd.register_fake
def _linear_kd_loss_fwd_fake(
    hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
    sparse_ids, sparse_values, sparse_tails, labels, kd_row_weights, ce_row_weights, kd_coef,
    ce_coef, temperature, label_smoothing, ignore_index, divergence, beta, chunk_size, backend,
    compute_grad,
):
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    want_h, want_w, want_b = compute_grad
    loss = hidden.new_empty((), dtype=acc)
    grad_h = torch.empty_like(hidden) if want_h else hidden.new_empty((0,))
    grad_w = torch.empty_like(weight) if want_w else weight.new_empty((0,))
    grad_b = torch.empty_like(bias) if want_b and bias is not None else hidden.new_empty((0,))
    return loss, grad_h, grad_w, grad_b


def _chunk(
    backend, logits, t, sparse, y, kd_w, ce_w, kd_coef, ce_coef, temperature, label_smoothing,
    ignore_index, divergence, beta, want,
):
    """One chunk's loss (the sum of its rows' weighted terms) and, when `want`, the gradient of
    its logits ``[rows, C]`` in their dtype."""
    if backend == "torch":
        return _torch_chunk(
            logits, t, sparse, y, kd_w, ce_w, kd_coef, ce_coef, temperature, label_smoothing,
            ignore_index, divergence, beta, want,
        )
    op = (
        torch.ops.fastkd.kd_loss_fwd_triton if backend == "triton" else torch.ops.fastkd.kd_loss_fwd
    )
    ids, values, tails = ([], [], []) if sparse is None else ([sparse[0]], [sparse[1]], [sparse[2]])
    loss, grad = op(
        logits.unsqueeze(1), [] if t is None else [t.unsqueeze(1)], y, kd_w, ce_w, [kd_coef],
        ce_coef, temperature, label_smoothing, ignore_index, False, want,
        sparse_ids=ids, sparse_values=values, sparse_tails=tails, divergence=divergence,
        beta=beta,
    )
    return loss, (grad.view(logits.shape) if want else None)


def _torch_chunk(
    logits, t, sparse, y, kd_w, ce_w, kd_coef, ce_coef, temperature, label_smoothing,
    ignore_index, divergence, beta, want,
):
    """`_chunk` with the plain-PyTorch reference: the kernel's contract (``loss = sum_b kd_coef *
    kd_w[b] * T * D_b + ce_coef * ce_w[b] * CE_b``) through ``fastkd.reference.kd_loss_ref`` per
    row, the gradient by autograd."""
    from ..reference import kd_loss_ref

    classes = logits.shape[-1]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if sparse is not None:
        ids, values, tails = sparse
        if ids.device.type == "cpu" and ((ids < 0) | (ids >= classes)).any():
            raise ValueError(f"teacher.indices must be class ids in [0, {classes})")
        t = tails[:, None].expand(-1, classes).clone()
        t.scatter_(-1, ids.long().clamp(0, classes - 1), values)
    with torch.enable_grad():
        s = logits.detach().requires_grad_(want)
        # T^2 * D per row (0 on uncounted rows).
        kd = kd_loss_ref(
            s, t, y, temperature=temperature, ignore_index=ignore_index, reduction="none",
            divergence=DIVERGENCES[divergence], beta=beta,
        )
        scale = kd_coef / temperature
        loss = (kd * (scale if kd_w is None else kd_w[0] * scale)).sum()
        if ce_coef != 0.0:
            ce = F.cross_entropy(
                s.to(acc), y, ignore_index=ignore_index, label_smoothing=label_smoothing,
                reduction="none",
            )
            loss = loss + ce_coef * (ce * ce_w).sum()
        grad = torch.autograd.grad(loss, s)[0] if want else None
    return loss.detach(), grad
