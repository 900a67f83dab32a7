"""Inputs and float64-reference comparisons shared by the kd_loss test files."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest
import torch
from tolerances import assert_grad_close, assert_loss_close

import fastkd
from fastkd.reference import kd_loss_ref

IGNORE = -100

# Triton's interpreter evaluates both sides of tl.where with numpy, so masked lanes (-inf - -inf,
# log 0, exp of the huge values some tests feed) raise numpy's RuntimeWarnings although their
# values are discarded; results are checked finite.
INTERPRETER_NOISE = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning:triton.runtime.interpreter",
    "ignore:divide by zero encountered:RuntimeWarning:triton.runtime.interpreter",
    "ignore:overflow encountered:RuntimeWarning:triton.runtime.interpreter",
)


@pytest.fixture(autouse=True)
def _seed():
    """Fresh random inputs per test, reproducible run to run; one intra-op thread.

    Tensors in these tests are small, and on a loaded machine every parallel ATen op (the float64
    reference's log_softmax, say) waits ~10 ms at OpenMP's barrier instead of ~5 us. The C++
    kernel's multi-threaded path is tested explicitly (test_cpu_kernel_across_thread_counts).
    """
    torch.manual_seed(20240611)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    teacher_dtype: torch.dtype | None = None,
    *,
    teachers: int = 1,
    labels: bool = True,
    ignore: bool = False,
    guided_hits: bool = False,
    scale: float = 2.0,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """Student ``[*shape]``, a list of teachers and labels ``shape[:-1]``.

    ``guided_hits``: teacher k is made right (its argmax = the label) on the rows b with
    (b + k) % 2 == 0 and left as drawn elsewhere, so guided KD keeps some rows and drops others.
    ``ignore``: every third row (from row 1) gets ``IGNORE``.
    """
    teacher_dtype = teacher_dtype or dtype
    classes = shape[-1]
    student = (torch.randn(*shape) * scale).to(dtype)
    ts = [(torch.randn(*shape) * scale).to(teacher_dtype) for _ in range(teachers)]
    y = None
    if labels or guided_hits or ignore:
        y = torch.randint(0, classes, tuple(shape[:-1]))
        flat_y = y.reshape(-1)
        rows = flat_y.numel()
        if guided_hits:
            for k, t in enumerate(ts):
                flat_t = t.view(rows, classes)
                for b in range(rows):
                    if (b + k) % 2 == 0:
                        flat_t[b, flat_y[b]] = flat_t[b].float().max() + 1.0
        if ignore:
            flat_y[1::3] = IGNORE
    return student, ts, y


def leaf_like(x: torch.Tensor) -> torch.Tensor:
    """A leaf copy of `x` that requires grad and keeps its strides (clone() would make a strided
    slice contiguous, and the kernels' strided paths would go untested)."""
    leaf = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    leaf.copy_(x.detach())
    assert leaf.stride() == x.stride()
    return leaf.requires_grad_(True)


def backend_grad(
    backend: str,
    student: torch.Tensor,
    teachers: torch.Tensor | list[torch.Tensor],
    labels: torch.Tensor | None = None,
    *,
    grad_scale: float = 1.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, d(grad_scale * loss)/d student); for reduction="none", the backward seeds each row
    with a different weight (so per-row scaling is checked)."""
    s = leaf_like(student)
    loss = fastkd.kd_loss(s, teachers, labels, backend=backend, **kwargs)
    _backward(loss, grad_scale)
    return loss.detach(), s.grad


def reference_grad(
    student: torch.Tensor,
    teachers: torch.Tensor | list[torch.Tensor],
    labels: torch.Tensor | None = None,
    *,
    grad_scale: float = 1.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as :func:`backend_grad` through ``kd_loss_ref`` in float64.

    Memoised on the inputs' bytes: tests parametrised over backends draw the same inputs (the
    seed is reset per test), and the plain-PyTorch reference is the slowest part of a check.
    """
    tensors = [student] + ([teachers] if isinstance(teachers, torch.Tensor) else list(teachers))
    if labels is not None:
        tensors.append(labels)
    digest = hashlib.blake2b(repr((grad_scale, sorted(kwargs.items()))).encode())
    for x in tensors:
        digest.update(repr((x.dtype, tuple(x.shape))).encode())
        digest.update(x.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    key = digest.hexdigest()
    if key not in _REFERENCE_CACHE:
        if len(_REFERENCE_CACHE) >= 256:
            _REFERENCE_CACHE.pop(next(iter(_REFERENCE_CACHE)))
        _REFERENCE_CACHE[key] = _reference_grad(student, teachers, labels, grad_scale, kwargs)
    loss, grad = _REFERENCE_CACHE[key]
    return loss.clone(), grad.clone()


_REFERENCE_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _reference_grad(student, teachers, labels, grad_scale, kwargs):
    s = student.detach().double().requires_grad_(True)
    if isinstance(teachers, torch.Tensor):
        t64 = teachers.double()
    else:
        t64 = [t.double() for t in teachers]
    loss = kd_loss_ref(s, t64, labels, **kwargs)
    _backward(loss, grad_scale)
    return loss.detach(), s.grad


def _grad_scale_bound(student, teachers, grad_scale, *, temperature=1.0, alpha=None,
                      teacher_weights=None, reduction="batchmean", **_) -> float:
    """The size of the gradient's terms before they cancel (q - p): every weight, divided as the
    reduction divides when all rows count."""
    k = 1 if isinstance(teachers, torch.Tensor) else len(teachers)
    weight = sum(teacher_weights) if teacher_weights is not None else k
    kd = (1.0 if alpha is None else alpha) * temperature * weight
    ce = 0.0 if alpha is None else 1.0 - alpha
    classes = student.shape[-1]
    rows = max(1, student.numel() // max(1, classes))
    if reduction == "mean":
        kd /= classes
    if reduction in ("batchmean", "mean"):
        kd, ce = kd / rows, ce / rows
    return abs(grad_scale) * (kd + ce)


def row_seeds(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    n = max(1, shape.numel())
    return torch.linspace(0.5, 2.0, n, dtype=dtype).view(shape)


def _backward(loss: torch.Tensor, grad_scale: float) -> None:
    if loss.dim() == 0:
        (grad_scale * loss).backward()
    else:
        (grad_scale * (loss * row_seeds(loss.shape, loss.dtype)).sum()).backward()


def check_against_reference(
    backend: str,
    student: torch.Tensor,
    teachers: torch.Tensor | list[torch.Tensor],
    labels: torch.Tensor | None = None,
    *,
    grad_scale: float = 1.0,
    msg: str = "",
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs `backend` and the float64 reference, checks loss (value, dtype, shape) and gradient
    with the tolerance table of the student's dtype, and returns the backend's (loss, grad)."""
    loss, grad = backend_grad(backend, student, teachers, labels, grad_scale=grad_scale, **kwargs)
    ref_loss, ref_grad = reference_grad(student, teachers, labels, grad_scale=grad_scale, **kwargs)
    what = f"[{backend}, {student.dtype}, {tuple(student.shape)}, {kwargs}] {msg}"
    expected_dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    assert loss.dtype == expected_dtype, f"loss dtype {loss.dtype} {what}"
    if kwargs.get("reduction") == "none":
        assert loss.shape == student.shape[:-1], f"loss shape {tuple(loss.shape)} {what}"
    else:
        assert loss.shape == (), f"loss shape {tuple(loss.shape)} {what}"
    assert grad is not None, f"no gradient {what}"
    assert grad.shape == student.shape, f"gradient shape {tuple(grad.shape)} {what}"
    assert_loss_close(loss, ref_loss, student.dtype, what)
    assert_grad_close(grad, ref_grad, student.dtype, what, min_scale=0.1 * _grad_scale_bound(
        student, teachers, grad_scale, **kwargs))
    return loss, grad
