"""The Triton kernel's reverse KL and JSD(beta) (fastkd::kd_loss_fwd_triton, DIVERGENCE 1 and 2)
against the float64 reference, option by option, on small shapes (the interpreter is slow): dense
and sparse teachers, cohorts, CE mix, ignored and guided rows, strided rows, dtypes, -inf logits,
T != 1, rows of one chunk and of several (C > 4096), with and without the gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
from kd_helpers import (
    INTERPRETER_NOISE,
    _grad_scale_bound,
    _seed,  # noqa: F401  (autouse fixture)
    backend_grad,
    make_inputs,
    row_seeds,
)
from tolerances import assert_grad_close, assert_loss_close

import fastkd
from fastkd import SparseTeacher
from fastkd.reference import kd_loss_ref

# Also log(0) on lanes whose term the kernel then drops (p = q = 0), evaluated by numpy.
pytestmark = [
    INTERPRETER_NOISE,
    pytest.mark.filterwarnings(
        "ignore:divide by zero encountered:RuntimeWarning:triton.runtime.interpreter"
    ),
]

DIVS = ("reverse_kl", "jsd")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def _reference(student, teachers, labels=None, **kw):
    """kd_loss_ref in float64 (a sparse teacher densified there) and its gradient, the backward
    seeded as kd_helpers.backend_grad seeds it."""
    teachers = teachers if isinstance(teachers, list) else [teachers]
    s = student.detach().double().requires_grad_(True)
    t64 = [t if isinstance(t, SparseTeacher) else t.double() for t in teachers]
    loss = kd_loss_ref(s, t64, labels, **kw)
    if loss.dim() == 0:
        loss.backward()
    else:
        (loss * row_seeds(loss.shape, loss.dtype)).sum().backward()
    return loss.detach(), s.grad


def _check(student, teachers, labels=None, **kw):
    """The Triton op against the float64 reference (the tolerance table of the student's dtype),
    with the gradient and without (compute_grad off); returns (loss, grad)."""
    loss, grad = backend_grad("triton", student, teachers, labels, **kw)
    ref_loss, ref_grad = _reference(student, teachers, labels, **kw)
    what = f"[{student.dtype}, {tuple(student.shape)}, {kw}]"
    assert_loss_close(loss, ref_loss, student.dtype, what)
    listed = teachers if isinstance(teachers, list) else [teachers]
    assert_grad_close(grad, ref_grad, student.dtype, what,
                      min_scale=0.1 * _grad_scale_bound(student, listed, 1.0, **kw))
    with torch.no_grad():
        plain = fastkd.kd_loss(student, teachers, labels, backend="triton", **kw)
    assert_loss_close(plain, ref_loss, student.dtype, what + " (forward only)")
    loss_err = (loss.double() - ref_loss).abs().max().item() / max(1.0, ref_loss.abs().max().item())
    grad_err = (grad.double() - ref_grad).abs().max().item() / ref_grad.abs().max().clamp_min(
        1e-30).item()
    _ERRORS.append((kw.get("divergence"), student.dtype, loss_err, grad_err))
    return loss, grad


# (divergence, dtype, loss error, gradient error relative to the largest entry) of every check,
# printed by the last test (pytest -s) for the record.
_ERRORS: list[tuple] = []



@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("classes", [1, 7, 1000, 5000])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_dense_teacher(divergence, classes, temperature):
    s, ts, _ = make_inputs((3, classes), labels=False)
    _check(s, ts[0], temperature=temperature, divergence=divergence, beta=0.3)


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_cohort_with_every_option(divergence, reduction):
    # Three teachers with weights, CE with smoothing, ignored rows, guided rows, a bf16 student.
    s, ts, y = make_inputs((7, 37), BF16, F32, teachers=3, ignore=True, guided_hits=True)
    _check(s, ts, y, temperature=2.5, alpha=0.6, label_smoothing=0.1, guided=True,
           teacher_weights=[0.5, 1.0, 2.0], reduction=reduction, divergence=divergence,
           beta=0.7)


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_eight_teachers_and_dtypes(divergence, dtype):
    s, ts, y = make_inputs((4, 19), dtype, teachers=8)
    _check(s, ts, y, temperature=1.0, alpha=0.5, divergence=divergence, beta=0.5)


@pytest.mark.parametrize("divergence", DIVS)
def test_strided_rows(divergence):
    # [outer, inner] rows: a [2, C, 3] tensor seen as [2, 3, C] (class stride != 1 is refused
    # by as_rows3d, so the student is a transposed-then-contiguous-in-C slice instead).
    base = torch.randn(2, 5, 3, 40) * 2
    s = base[:, 1]  # [2, 3, 40], strides (600, 40, 1)
    t = (torch.randn(2, 3, 2, 40) * 2)[:, :, 0]  # [2, 3, 40], strides (240, 80, 1)
    _check(s, t, temperature=2.5, reduction="none", divergence=divergence, beta=0.4)


@pytest.mark.parametrize("divergence", DIVS)
def test_infinite_logits(divergence):
    s, ts, _ = make_inputs((4, 30), labels=False, teachers=2)
    s[0, :5] = -math.inf  # q = 0 there
    s[1, :] = -math.inf
    s[1, 3] = 1.0  # one class left
    if divergence == "jsd":
        ts[0][2, 10:20] = -math.inf  # p = 0 where q > 0: finite for the JSD
    ts[1][0, :5] = -math.inf  # p = 0 where q = 0 as well
    _check(s, ts, temperature=2.5, reduction="none", divergence=divergence, beta=0.5)


@pytest.mark.parametrize("divergence", DIVS)
def test_zero_weights(divergence):
    # A teacher of weight 0 and rows that count nowhere (ignored, no CE): exactly 0, no NaN.
    s, ts, y = make_inputs((6, 33), teachers=2, ignore=True)
    ts[0][1] = math.nan  # an ignored row's teacher is never read into the result
    _, grad = _check(s, ts, y, teacher_weights=[0.0, 1.5], reduction="none",
                     divergence=divergence)
    assert torch.all(grad[1::3] == 0)


def _sparse(teacher: torch.Tensor, k: int, kind: str = "log_probs") -> SparseTeacher:
    return SparseTeacher.from_logits(teacher, k, kind=kind)


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize(("classes", "k"), [(1, 1), (7, 3), (7, 7), (300, 20), (5000, 40)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_sparse_teacher(divergence, classes, k, temperature):
    s, ts, _ = make_inputs((3, classes), labels=False)
    _check(s, _sparse(ts[0], k), temperature=temperature, divergence=divergence, beta=0.3)


@pytest.mark.parametrize("kind", ["logits", "probs"])
def test_sparse_jsd_tails(kind):
    # tail "none" (p = 0 outside the ids: lm = log(1 - beta) + lq there) and "uniform".
    s, ts, _ = make_inputs((4, 50), labels=False)
    _check(s, _sparse(ts[0], 6, kind), temperature=2.5, reduction="none", divergence="jsd",
           beta=0.8)


@pytest.mark.parametrize("divergence", DIVS)
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_dense_and_sparse_cohort(divergence, dtype):
    # Two dense and three sparse teachers (overlapping ids, one k == C) with CE and guided rows.
    s, ts, y = make_inputs((5, 24), dtype, F32, teachers=5, ignore=True, guided_hits=True)
    teachers = [ts[0], _sparse(ts[1], 5), ts[2], _sparse(ts[3], 24), _sparse(ts[4], 1)]
    _check(s, teachers, y, temperature=2.5, alpha=0.7, label_smoothing=0.05, guided=True,
           teacher_weights=[1.0, 0.5, 0.25, 2.0, 1.0], divergence=divergence, beta=0.6)


@pytest.mark.parametrize("divergence", DIVS)
def test_without_gradient(divergence):
    s, ts, y = make_inputs((5, 60), teachers=2)
    teachers = [ts[0], _sparse(ts[1], 7)]
    kw = dict(temperature=2.5, alpha=0.5, divergence=divergence, beta=0.4, reduction="none")
    loss = fastkd.kd_loss(s, teachers, y, backend="triton", **kw)  # no grad: compute_grad off
    ref, _ = _reference(s, teachers, y, **kw)
    assert_loss_close(loss, ref, F32)


def test_beta_checked_by_the_op():
    s = torch.zeros(1, 1, 4)
    with pytest.raises(ValueError, match="beta"):
        torch.ops.fastkd.kd_loss_fwd_triton(s, [s], None, None, None, [1.0], 0.0, 1.0, 0.0,
                                            -100, False, False, [], [], [], 2, 1.0)
    with pytest.raises(ValueError, match="divergence"):
        torch.ops.fastkd.kd_loss_fwd_triton(s, [s], None, None, None, [1.0], 0.0, 1.0, 0.0,
                                            -100, False, False, [], [], [], 3, 0.5)


def test_largest_errors():
    """The largest errors of the checks above (relative to max(1, |loss|) and to the largest
    gradient entry), per divergence and dtype; run with -s to see them."""
    worst: dict[tuple, list[float]] = {}
    for div, dtype, le, ge in _ERRORS:
        w = worst.setdefault((div, str(dtype)), [0.0, 0.0])
        w[0], w[1] = max(w[0], le), max(w[1], ge)
    for key, (le, ge) in sorted(worst.items()):
        print(f"{key}: loss {le:.2e}, grad {ge:.2e}")


@pytest.mark.parametrize("divergence", [1, 2])
def test_opcheck(divergence):
    # Schema, autograd registration and fake tensors with the divergence arguments (the AOT
    # checks need a GPU: see test_kd_loss_ops.py).
    s, ts, y = make_inputs((6, 24), teachers=2)
    sp = _sparse(torch.randn(6, 24), 5)
    ids, vals, tails = sp._for_kernel(24, F32)
    args = (s.view(2, 3, 24), [t.view(2, 3, 24) for t in ts], y, None, None, [0.5, 0.3, 0.2],
            0.4, 2.0, 0.1, -100, True, True, [ids], [vals], [tails], divergence, 0.3)
    torch.library.opcheck(torch.ops.fastkd.kd_loss_fwd_triton.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
