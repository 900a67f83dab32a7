"""``fastkd.kd_loss(..., divergence="reverse_kl" | "jsd", beta=...)`` on every backend of this
machine, against the float64 reference of the definition (``fastkd.reference.kd_loss_ref``).

The option grid (temperature, CE mix and label smoothing, guided KD, ignored rows, cohorts with
weights, every reduction), sparse teachers, -inf logits, float64 gradcheck through the C++ op,
TRL's ``generalized_jsd_loss`` (which omits the T^2), identities between the divergences, the
refusals, and the C++ kernel's CPU-capability variants. Forward KL is tested by the other kd_loss
test files. Triton runs under its interpreter here, on fewer rows.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CPU_BACKENDS
from kd_helpers import (
    IGNORE,
    INTERPRETER_NOISE,
    _grad_scale_bound,
    _seed,  # noqa: F401  (autouse fixture)
    backend_grad,
    check_against_reference,
    make_inputs,
)
from machine import CPU_CAPABILITIES, check_capability_variant
from tolerances import assert_grad_close, assert_loss_close

import fastkd
from fastkd import SparseTeacher
from fastkd.reference import kd_loss_ref

pytestmark = INTERPRETER_NOISE

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
FUSED = tuple(b for b in CPU_BACKENDS if b != "torch")
# (divergence, beta): beta is read by the JSD only.
DIVERGENCES = [("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9)]
DIV_IDS = ["reverse", "jsd0.5", "jsd0.1", "jsd0.9"]


def small(backend: str, rows: int) -> int:
    """Fewer rows under the Triton interpreter (~10 ms a row and teacher)."""
    return min(rows, 3) if backend == "triton" else rows


# --- the option grid --------------------------------------------------------------------------

TEMPERATURES = (1.0, 3.5)
ALPHA_EPS = ((None, 0.0), (0.6, 0.0), (0.3, 0.15))
GRID = list(itertools.product(TEMPERATURES, ALPHA_EPS, (False, True), (False, True), (1, 3)))
# The interpreter runs a corner of each axis; the C++ kernel takes the whole grid.
GRID_TRITON = [g for g in GRID if g[0] == 3.5 and g[3] and (g[4] == 3) == (g[2] or g[1][0] is None)]


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIV_IDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_option_combination(backend, divergence, beta, reduction):
    """temperature x alpha/label smoothing x guided x ignored rows x cohort (with weights)."""
    grid = GRID_TRITON if backend == "triton" else GRID
    if backend == "triton" and (reduction != "batchmean" or beta == 0.1):
        grid = grid[:1]  # the other reductions and betas only change coefficients
    for index, (temperature, (alpha, eps), guided, ignore, k) in enumerate(grid):
        torch.manual_seed(index)
        s, ts, y = make_inputs((small(backend, 5), 37), teachers=k, labels=True, ignore=ignore,
                               guided_hits=guided)
        kw = dict(temperature=temperature, alpha=alpha, label_smoothing=eps, guided=guided,
                  reduction=reduction, divergence=divergence, beta=beta)
        if k == 3:
            kw["teacher_weights"] = [0.7, 1.6, 0.2]
        labels = y if (alpha is not None or guided or ignore) else None
        check_against_reference(backend, s, ts if k > 1 else ts[0], labels, msg=f"ignore={ignore}",
                                **kw)


# Class counts: one class, odd widths around the vector sizes, wider than the Triton block.
CLASSES = (1, 7, 37, 1000, 5003)


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("dtype,tdtype", [(F32, F32), (BF16, BF16), (F16, F32), (F64, F64)])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:2], ids=DIV_IDS[:2])
@pytest.mark.parametrize("backend", FUSED)
def test_dtypes_and_class_counts(backend, divergence, beta, dtype, tdtype, classes):
    if backend != "cpu" and dtype == F64:
        pytest.skip("float64 runs on the CPU backend only")
    if backend == "triton" and classes > 1000 and dtype != F32:
        pytest.skip("one wide row per dtype is enough under the interpreter")
    s, ts, y = make_inputs((small(backend, 6), classes), dtype, tdtype, teachers=2, ignore=True)
    check_against_reference(backend, s, ts, y, temperature=2.0, alpha=0.8, label_smoothing=0.05,
                            teacher_weights=[1.0, 0.5], divergence=divergence, beta=beta)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:2], ids=DIV_IDS[:2])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_token_logits_with_ignored_positions(backend, divergence, beta):
    """[B, L, C] logits of a language model, a strided slice of them, padding positions ignored."""
    full = torch.randn(2, small(backend, 5) + 1, 53) * 2
    s = full[:, :-1]  # the usual shift: not contiguous over rows
    t = torch.randn(s.shape) * 2
    y = torch.randint(0, 53, s.shape[:-1])
    y[0, -2:] = IGNORE
    check_against_reference(backend, s, t, y, temperature=2.0, divergence=divergence, beta=beta)


# --- sparse teachers --------------------------------------------------------------------------


def _sparse(lead, classes, k, tail, *, top=True, vdtype=F32) -> SparseTeacher:
    t = torch.randn(*lead, classes, dtype=F64) * 2
    ids = t.topk(k, -1).indices if top else torch.rand(*lead, classes).argsort(-1)[..., :k]
    if tail == "none":
        return SparseTeacher(ids.int(), t.gather(-1, ids).to(vdtype), kind="logits", tail="none")
    return SparseTeacher(ids, torch.log_softmax(t, -1).gather(-1, ids).to(vdtype))


def _check_with_reference(backend, s, teachers, labels=None, **kw):
    """`backend` against kd_loss_ref in float64 (which densifies sparse teachers itself)."""
    loss, grad = backend_grad(backend, s, teachers, labels, **kw)
    s64 = s.detach().double().requires_grad_(True)
    t64 = [t if isinstance(t, SparseTeacher) else t.double() for t in teachers]
    ref = kd_loss_ref(s64, t64, labels, **kw)
    (ref if ref.dim() == 0 else (ref * torch.linspace(0.5, 2.0, ref.numel(),
                                                      dtype=F64).view(ref.shape)).sum()).backward()
    what = f"[{backend}, {s.dtype}, {tuple(s.shape)}, {kw}]"
    assert_loss_close(loss, ref.detach(), s.dtype, what)
    assert_grad_close(grad, s64.grad, s.dtype, what, min_scale=0.1 * _grad_scale_bound(
        s, teachers, 1.0, **kw))
    with torch.no_grad():  # forward only: the same loss
        plain = fastkd.kd_loss(s, teachers, labels, backend=backend, **kw)
    assert_loss_close(plain, ref.detach(), s.dtype, what + " (forward only)")


SPARSE_CASES = [
    # (k, tail, top, options)
    (5, "uniform", True, {}),
    (5, "uniform", False, {"temperature": 3.0, "alpha": 0.5, "label_smoothing": 0.1}),
    (1, "uniform", True, {"reduction": "none"}),
    ("C", "uniform", False, {"temperature": 2.0}),
    (64, "none", True, {"temperature": 2.0}),
    (3, "none", False, {"guided": True, "alpha": 0.7}),
]


# Reverse KL against tail "none" is infinite and refused (test_reverse_kl_refuses_a_zero_tail).
SPARSE_GRID = [(d, b, case) for (d, b), case in itertools.product(DIVERGENCES[:3],
                                                                  range(len(SPARSE_CASES)))
               if not (d == "reverse_kl" and SPARSE_CASES[case][1] == "none")]


@pytest.mark.parametrize("divergence,beta,case", SPARSE_GRID)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse_teachers(backend, divergence, beta, case):
    k, tail, top, kw = SPARSE_CASES[case]
    classes = 211
    k = classes if k == "C" else k
    lead = (small(backend, 7),)
    torch.manual_seed(case)
    s = torch.randn(*lead, classes) * 2
    y = torch.randint(0, classes, lead)
    y[1] = IGNORE
    t = _sparse(lead, classes, k, tail, top=top)
    if kw.get("guided"):
        y[0] = t.indices[0, t.values[0].argmax()]  # the teacher is right on row 0
    labels = y if (kw.get("alpha") or kw.get("guided") or case % 2) else None
    _check_with_reference(backend, s, [t], labels, divergence=divergence, beta=beta, **kw)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:2], ids=DIV_IDS[:2])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cohort_mixing_dense_and_sparse(backend, divergence, beta):
    lead, classes = (small(backend, 6),), 129
    s = (torch.randn(*lead, classes) * 2).to(BF16)
    teachers = [
        _sparse(lead, classes, 8, "uniform"),
        torch.randn(*lead, classes) * 2,
        _sparse(lead, classes, 3, "uniform", top=False, vdtype=BF16),
    ]
    y = torch.randint(0, classes, lead)
    _check_with_reference(backend, s, teachers, y, temperature=2.0, alpha=0.6,
                          teacher_weights=[0.5, 1.0, 2.0], divergence=divergence, beta=beta)


# --- -inf logits, ignored batches, the float64 gradient ---------------------------------------


@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:2], ids=DIV_IDS[:2])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_vocabulary(backend, divergence, beta):
    """Classes that both student and teacher mask with -inf contribute exactly 0; a class only the
    student masks is fine for every divergence (q = 0 there)."""
    s, ts, y = make_inputs((small(backend, 4), 23), teachers=1)
    s[:, 20:] = -math.inf
    ts[0][:, 20:] = -math.inf
    s[0, 3] = -math.inf  # student only
    loss, grad = check_against_reference(backend, s, ts[0], y, temperature=2.0, alpha=0.5,
                                         divergence=divergence, beta=beta)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[:, 20:] == 0).all() and grad[0, 3] == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reverse_kl_is_infinite_where_only_the_teacher_masks(backend):
    s, ts, _ = make_inputs((small(backend, 3), 11), teachers=1, labels=False)
    ts[0][1, 4] = -math.inf
    loss = fastkd.kd_loss(s, ts[0], divergence="reverse_kl", reduction="none", backend=backend)
    assert loss[1] == math.inf and torch.isfinite(loss[[0, 2]]).all()
    jsd = fastkd.kd_loss(s, ts[0], divergence="jsd", reduction="none", backend=backend)
    assert torch.isfinite(jsd).all()


@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:2], ids=DIV_IDS[:2])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_ignored_batch_is_zero(backend, divergence, beta):
    s, ts, _ = make_inputs((small(backend, 4), 9), teachers=1, labels=False)
    y = torch.full((s.shape[0],), IGNORE)
    loss, grad = backend_grad(backend, s, ts[0], y, alpha=0.5, divergence=divergence, beta=beta)
    assert loss == 0 and (grad == 0).all()


@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:2], ids=DIV_IDS[:2])
def test_gradcheck_float64_through_the_cpu_op(divergence, beta):
    s, ts, y = make_inputs((3, 2, 7), F64, teachers=2, ignore=True)
    sparse = _sparse((3, 2), 7, 3, "uniform", vdtype=F64)
    x = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: fastkd.kd_loss(x, [*ts, sparse], y, temperature=1.7, alpha=0.6,
                                 label_smoothing=0.1, teacher_weights=[1.0, 0.3, 0.8],
                                 divergence=divergence, beta=beta, backend="cpu"), (x,))
    assert torch.autograd.gradcheck(
        lambda x: fastkd.kd_loss(x, ts[0], temperature=2.0, reduction="sum",
                                 divergence=divergence, beta=beta, backend="cpu"), (x,))


# --- what the divergences are -----------------------------------------------------------------


def trl_generalized_jsd_loss(student_logits, teacher_logits, beta, temperature):
    """TRL's GKD trainer's ``generalized_jsd_loss`` for 0 < beta < 1, batchmean, as it is written
    there: log-softmax at T, log of the mixture by logsumexp, two ``kl_div``s."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    b = torch.tensor(beta, dtype=s.dtype)
    mixture = torch.logsumexp(torch.stack([s + torch.log(1 - b), t + torch.log(b)]), dim=0)
    kl_teacher = F.kl_div(mixture, t, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture, s, reduction="none", log_target=True)
    jsd = b * kl_teacher + (1 - b) * kl_student
    return jsd.sum() / jsd.size(0)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_jsd_over_t_squared_is_trl_generalized_jsd(backend, beta):
    s, ts, _ = make_inputs((small(backend, 6), 31), teachers=1, labels=False)
    T = 2.0
    ours = fastkd.kd_loss(s, ts[0], temperature=T, divergence="jsd", beta=beta, backend=backend)
    trl = trl_generalized_jsd_loss(s.double(), ts[0].double(), beta, T)
    torch.testing.assert_close(ours.double() / T**2, trl, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reverse_kl_is_forward_kl_with_the_roles_swapped(backend):
    s, ts, _ = make_inputs((small(backend, 5), 19), teachers=1, labels=False)
    reverse = fastkd.kd_loss(s, ts[0], temperature=3.0, divergence="reverse_kl", backend=backend)
    swapped = fastkd.kd_loss(ts[0], s, temperature=3.0, backend=backend)
    torch.testing.assert_close(reverse, swapped, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=DIV_IDS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_identical_logits_give_zero(backend, divergence, beta):
    s, _, _ = make_inputs((small(backend, 4), 29), teachers=0, labels=False)
    loss, grad = backend_grad(backend, s, s.clone(), temperature=2.0, divergence=divergence,
                              beta=beta)
    assert abs(loss.item()) < 1e-6 and grad.abs().max() < 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_jsd_half_is_symmetric(backend):
    s, ts, _ = make_inputs((small(backend, 4), 17), teachers=1, labels=False)
    a = fastkd.kd_loss(s, ts[0], divergence="jsd", backend=backend)
    b = fastkd.kd_loss(ts[0], s, divergence="jsd", backend=backend)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:2], ids=DIV_IDS[:2])
def test_cpu_kernel_is_deterministic_across_thread_counts(divergence, beta):
    s, ts, y = make_inputs((64, 301), teachers=2, ignore=True)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(backend_grad("cpu", s, ts, y, alpha=0.5, divergence=divergence, beta=beta))
    (l1, g1), (l2, g2) = results
    assert torch.equal(l1, l2) and torch.equal(g1, g2)


# --- refusals ---------------------------------------------------------------------------------


def test_reverse_kl_refuses_a_zero_tail():
    s = torch.randn(3, 10)
    t = _sparse((3,), 10, 4, "none")
    with pytest.raises(ValueError, match="reverse_kl.*tail='none'"):
        fastkd.kd_loss(s, t, divergence="reverse_kl")
    with pytest.raises(ValueError, match="reverse_kl.*tail='none'"):
        fastkd.kd_loss(s, [torch.randn(3, 10), t], divergence="reverse_kl", backend="torch")
    # With every class among the ids there is no tail: nothing to refuse.
    full = _sparse((3,), 10, 10, "none")
    assert torch.isfinite(fastkd.kd_loss(s, full, divergence="reverse_kl"))


@pytest.mark.parametrize("divergence,beta,error,match", [
    ("kl", 0.5, ValueError, "divergence must be one of"),
    ("jsd", 0.0, ValueError, "beta must be > 0"),
    ("jsd", 1.0, ValueError, "beta must be < 1"),
    ("jsd", float("nan"), ValueError, "beta must be finite"),
    ("jsd", "0.5", TypeError, "beta must be a real number"),
])
def test_bad_divergence_options(divergence, beta, error, match):
    s = torch.randn(2, 5)
    with pytest.raises(error, match=match):
        fastkd.kd_loss(s, s, divergence=divergence, beta=beta)
    with pytest.raises(error, match=match):
        fastkd.nn.KDLoss(divergence=divergence, beta=beta)


def test_op_refuses_unknown_codes():
    s = torch.randn(1, 2, 5)
    args = (s, [s], None, None, None, [1.0], 0.0, 1.0, 0.0, IGNORE, False, False, [], [], [])
    with pytest.raises(RuntimeError, match="divergence must be 0"):
        torch.ops.fastkd.kd_loss_fwd(*args, divergence=3)
    with pytest.raises(RuntimeError, match="beta must be in"):
        torch.ops.fastkd.kd_loss_fwd(*args, divergence=2, beta=1.5)


def test_module_form():
    loss = fastkd.nn.KDLoss(temperature=2.0, divergence="jsd", beta=0.3)
    assert "divergence='jsd', beta=0.3" in repr(loss)
    s, ts, _ = make_inputs((4, 9), teachers=1, labels=False)
    torch.testing.assert_close(
        loss(s, ts[0]), fastkd.kd_loss(s, ts[0], temperature=2.0, divergence="jsd", beta=0.3))


# --- the op as PyTorch sees it ----------------------------------------------------------------


@pytest.mark.parametrize("divergence", [1, 2])
def test_opcheck(divergence):
    from torch.library import opcheck

    s = torch.randn(2, 3, 13)
    t = torch.randn(2, 3, 13)
    y = torch.randint(0, 13, (6,))
    args = (s, [t], y, None, None, [0.5], 0.3, 2.0, 0.1, IGNORE, False, True, [], [], [])
    opcheck(torch.ops.fastkd.kd_loss_fwd.default, args,
            {"divergence": divergence, "beta": 0.25})


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_compile_fullgraph_matches_eager(divergence):
    s, ts, y = make_inputs((4, 5, 29), teachers=1, ignore=True)

    def step(x):
        return fastkd.kd_loss(x, ts[0], y, temperature=2.0, alpha=0.5, divergence=divergence,
                              beta=0.3, backend="cpu")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, step):
        x = s.clone().requires_grad_(True)
        out = fn(x)
        (2.5 * out).backward()
        results.append((out.detach(), x.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=2e-6, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=2e-6, atol=1e-9)


CAPABILITY_SCRIPT = """
    import torch
    import fastkd
    from kd_helpers import check_against_reference, make_inputs

    print(torch.backends.cpu.get_cpu_capability())
    torch.manual_seed(0)
    torch.set_num_threads(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        # 37 classes: full vectors of every width (8, 16 floats) and a remainder.
        s, ts, y = make_inputs((6, 37), dtype, teachers=2, ignore=True)
        ids = torch.rand(6, 37).argsort(-1)[:, :5]
        log_p = torch.log_softmax(torch.randn(6, 37), -1)
        sparse = fastkd.SparseTeacher(ids, log_p.gather(-1, ids))
        for div in ("reverse_kl", "jsd"):
            check_against_reference("cpu", s, ts, y, alpha=0.4, temperature=2.0,
                                    label_smoothing=0.1, divergence=div, beta=0.3)
            loss = fastkd.kd_loss(s, [ts[0], sparse], y, divergence=div, backend="cpu")
            ref = fastkd.kd_loss(s.double(), [ts[0].double(), sparse], y, divergence=div,
                                 backend="torch")
            assert abs(loss.item() - ref.item()) < 1e-2 * max(1.0, abs(ref.item())), (div, dtype)
    print("ok")
"""


@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_cpu_capability_variants_match_the_reference(capability):
    check_capability_variant(CAPABILITY_SCRIPT, capability)
