"""fastkd.kd_loss against the float64 reference on every backend that runs on this machine.

Dtypes, shapes, every option combination, teacher cohorts, strided inputs, gradients (scaling,
teacher, no-grad path, retain_graph), extreme values, determinism and the nn.Module form.
Triton runs under its interpreter here (one Python-level program per row, ~10 ms a row and
teacher), so its shapes are smaller; the C++ backend takes the full sizes.
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
    _seed,  # noqa: F401  (autouse fixture)
    backend_grad,
    check_against_reference,
    make_inputs,
    reference_grad,
)
from tolerances import assert_grad_close, assert_loss_close
from torch.utils._python_dispatch import TorchDispatchMode

import fastkd
from fastkd._inputs import as_rows3d

pytestmark = INTERPRETER_NOISE

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
FUSED = tuple(b for b in CPU_BACKENDS if b != "torch")
KD_OPS = ("fastkd.kd_loss_fwd.default", "fastkd.kd_loss_fwd_triton.default")


class OpLog(TorchDispatchMode):
    """Records every op dispatched inside the block: (name, args, output)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((str(func), args, out))
        return out

    def kd_calls(self) -> list[tuple]:
        return [args for name, args, _ in self.calls if name in KD_OPS]

    def copies(self, numel: int) -> list[str]:
        """Ops that wrote a tensor of `numel` elements copied from another tensor."""
        copying = ("aten.clone", "aten.copy_", "aten._to_copy", "aten.contiguous")
        found = []
        for name, _, out in self.calls:
            if name.startswith(copying) and isinstance(out, torch.Tensor) and out.numel() == numel:
                found.append(name)
        return found


def small(backend: str, rows: int) -> int:
    """Fewer rows under the Triton interpreter."""
    return min(rows, 4) if backend == "triton" else rows


# --- the definition ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_plain_call_is_kl_div_batchmean_times_t2(backend, temperature):
    s, (t,), _ = make_inputs((small(backend, 13), 301), labels=False)
    loss, grad = backend_grad(backend, s, t, temperature=temperature)
    s64 = s.double().requires_grad_(True)
    T = temperature
    want = F.kl_div(
        F.log_softmax(s64 / T, -1), F.log_softmax(t.double() / T, -1), log_target=True,
        reduction="batchmean",
    ) * T**2
    want.backward()
    assert_loss_close(loss, want, F32)
    assert_grad_close(grad, s64.grad, F32)
    # dKD/ds = (T / B) (q - p), the closed form in docs/methods.md#kd.
    q, p = torch.softmax(s.double() / T, -1), torch.softmax(t.double() / T, -1)
    assert_grad_close(grad, T / s.shape[0] * (q - p), F32)


# --- dtypes -----------------------------------------------------------------------------------

DTYPE_PAIRS = [(F32, F32), (BF16, BF16), (F16, F16), (F32, BF16), (BF16, F32), (F16, F32),
               (F32, F16), (BF16, F16)]
DTYPE_CASES = [
    pytest.param(b, sd, td, id=f"{b}-{str(sd)[6:]}-{str(td)[6:]}")
    for b in CPU_BACKENDS
    for sd, td in DTYPE_PAIRS + ([(F64, F64)] if b in ("cpu", "torch") else [])
]
OPTION_SETS = {
    "kd": {},
    "mixed": {"temperature": 2.5, "alpha": 0.3, "label_smoothing": 0.1, "guided": True},
}


@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("backend,sdtype,tdtype", DTYPE_CASES)
def test_dtypes(backend, sdtype, tdtype, options):
    kw = OPTION_SETS[options]
    needs_labels = bool(kw)
    s, ts, y = make_inputs((small(backend, 41), 1271), sdtype, tdtype, labels=needs_labels,
                           ignore=needs_labels, guided_hits=kw.get("guided", False))
    check_against_reference(backend, s, ts[0], y, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cohort_in_mixed_teacher_dtypes(backend):
    s, ts, y = make_inputs((small(backend, 9), 257), F32, teachers=3, ignore=True)
    ts = [ts[0].to(F16), ts[1].to(BF16), ts[2]]
    check_against_reference(backend, s, ts, y, temperature=2.0, alpha=0.5,
                            teacher_weights=[1.0, 0.5, 2.0])


# --- shapes -----------------------------------------------------------------------------------

SHAPES = {
    "one_row": (1, 50),
    "one_class": (9, 1),
    "one_by_one": (1, 1),
    "odd": (41, 1271),
    "tokens": (3, 5, 97),
    "4d": (2, 3, 2, 33),
    "vector": (77,),
    "wide": (3, 32768),
}
SHAPES_TRITON = dict(SHAPES, odd=(3, 1271), tokens=(2, 2, 97), wide=(1, 32768))
SHAPES_TORCH = dict(SHAPES, wide=(2, 32768))


def _shape(backend: str, name: str) -> tuple[int, ...]:
    return {"triton": SHAPES_TRITON, "torch": SHAPES_TORCH}.get(backend, SHAPES)[name]


@pytest.mark.parametrize("mixed", [False, True], ids=["kd", "mixed"])
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shapes(backend, name, mixed):
    shape = _shape(backend, name)
    s, ts, y = make_inputs(shape, labels=mixed, ignore=mixed and len(shape) > 1 and shape[0] > 2)
    kw = {"temperature": 2.0, "alpha": 0.5, "label_smoothing": 0.1} if mixed else {}
    check_against_reference(backend, s, ts[0], y, **kw)
    check_against_reference(backend, s, ts[0], y, reduction="none", **kw)


@pytest.mark.parametrize("lead", [(7,), (3, 5), (2, 3, 4), ()])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_reduction_none_has_the_leading_shape(backend, lead):
    s, ts, y = make_inputs((*lead, 11), ignore=True)
    loss = fastkd.kd_loss(s, ts[0], y, alpha=0.5, reduction="none", backend=backend)
    assert loss.shape == torch.Size(lead)
    ref = fastkd.reference.kd_loss_ref(s.double(), ts[0].double(), y, alpha=0.5, reduction="none")
    assert_loss_close(loss, ref, F32)


# --- every option combination ----------------------------------------------------------------

ALPHA_EPS = [(None, 0.0), (0.0, 0.0), (0.0, 0.1), (0.3, 0.0), (0.3, 0.1), (1.0, 0.0), (1.0, 0.2)]
GRID = list(itertools.product([1.0, 3.5], ALPHA_EPS, [False, True], [False, True], [1, 2]))
# Under the Triton interpreter (~10 ms a row and teacher) the full grid costs ~10 s a reduction.
# "sum" and "mean" differ from "batchmean" only in the coefficients that the Python plan, shared
# with the C++ backend (checked on the full grid for every reduction), hands to the same kernel;
# "none" only in the per-row output. They run a cohort at T = 3.5 with three CE settings.
GRID_TRITON_SUBSET = [g for g in GRID if g[0] == 3.5 and g[4] == 2 and g[1] in ALPHA_EPS[::3]]
GRID_CASES = [(b, r) for b in CPU_BACKENDS for r in ("batchmean", "sum", "mean", "none")]


def _grid(backend: str, reduction: str) -> list[tuple]:
    if backend == "triton" and reduction != "batchmean":
        return GRID_TRITON_SUBSET
    return GRID


def _grid_case(backend, reduction, index, temperature, alpha_eps, guided, ignore, k):
    alpha, eps = alpha_eps
    torch.manual_seed(index)  # the same inputs for every backend (the reference is memoised)
    needs_labels = alpha is not None or guided or ignore or k == 2
    s, ts, y = make_inputs((4, 37), teachers=k, labels=needs_labels, ignore=ignore,
                           guided_hits=guided)
    if y is not None and index % 2:
        y = y.int()
    kw = dict(temperature=temperature, alpha=alpha, label_smoothing=eps, guided=guided,
              reduction=reduction)
    if k == 2:
        kw["teacher_weights"] = [0.7, 1.6]
    check_against_reference(backend, s, ts if k > 1 else ts[0], y, msg=f"ignore={ignore}", **kw)


@pytest.mark.parametrize("backend,reduction", GRID_CASES)
def test_every_option_combination(backend, reduction):
    """temperature x alpha/label_smoothing x guided x ignored rows x cohort (with weights) x labels
    int64/int32, for one reduction."""
    for case in _grid(backend, reduction):
        _grid_case(backend, reduction, GRID.index(case), *case)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_labels_int32_and_int64_agree_bitwise(backend):
    s, ts, y = make_inputs((small(backend, 12), 40), teachers=2, ignore=True, guided_hits=True)
    kw = dict(alpha=0.4, guided=True, temperature=2.0, label_smoothing=0.05)
    l64, g64 = backend_grad(backend, s, ts, y, **kw)
    l32, g32 = backend_grad(backend, s, ts, y.int(), **kw)
    assert torch.equal(l64, l32) and torch.equal(g64, g32)


# --- teacher cohorts --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["kd", "guided_ce"])
@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_teacher_cohorts(backend, k, mode):
    rows = 3 if backend == "triton" else 10
    s, ts, y = make_inputs((rows, 61), teachers=k, ignore=mode != "kd", guided_hits=mode != "kd")
    weights = (torch.rand(k) * 2).tolist()
    if k >= 3:
        weights[1] = 0.0  # a silent cohort member costs nothing and adds nothing
    kw = {"temperature": 3.0} if mode == "kd" else {"alpha": 0.1, "guided": True}
    check_against_reference(backend, s, ts, y, teacher_weights=weights, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cohort_on_rows_of_several_chunks(backend):
    # Rows wider than one Triton chunk (4096 classes), where the dense teachers' statistics ride
    # along with the student's sweep: guided rows (some teachers weigh 0 on a row), a silent
    # teacher, -inf logits in one teacher and a large common offset, CE with smoothing.
    s, ts, y = make_inputs((3, 5003), BF16, F32, teachers=3, ignore=True, guided_hits=True)
    ts[2][0, :2500] = -math.inf
    s, ts = s + 300.0, [t + 300.0 for t in ts]
    check_against_reference(backend, s, ts, y, alpha=0.3, guided=True, temperature=2.5,
                            label_smoothing=0.1, teacher_weights=[1.0, 0.0, 0.7])


def test_nine_teachers_auto_falls_back_to_torch():
    s, ts, y = make_inputs((6, 30), teachers=9, ignore=True)
    with OpLog() as log:
        check_against_reference("auto", s, ts, y, alpha=0.2, temperature=2.0)
    assert log.kd_calls() == [], "9 teachers exceed the kernels; auto must run the torch backend"


@pytest.mark.parametrize("backend", FUSED)
def test_teacher_limit_comes_from_the_extension(backend):
    """csrc/kd_loss.h defines the limit; the functional form and the Triton kernel (one pointer
    argument per teacher) read it from fastkd._C, and the ops enforce it."""
    limit = fastkd._C.max_teachers
    s, ts, _ = make_inputs((2, 9), teachers=limit + 1, labels=False)
    with pytest.raises(ValueError, match=rf"{backend}: {limit + 1} teachers; the kernels take at "
                                         rf"most {limit}"):
        fastkd.kd_loss(s, ts, backend=backend)
    check_against_reference(backend, s, ts[:limit], None)
    s3, t3 = s.unsqueeze(1), [t.unsqueeze(1) for t in ts]
    op = {"cpu": torch.ops.fastkd.kd_loss_fwd, "triton": torch.ops.fastkd.kd_loss_fwd_triton}
    with pytest.raises((RuntimeError, ValueError), match=rf"takes 1 to {limit} teachers"):
        op[backend](s3, t3, None, None, None, [1.0] * len(t3), 0.0, 1.0, 0.0, -100, False, False,
                    [], [], [])
    if backend == "triton":
        from fastkd.kernels import kd_loss as triton_kd

        names = triton_kd._kd_loss_fwd_kernel.arg_names
        assert triton_kd.MAX_TEACHERS == limit
        assert [n for n in names if n[0] == "t" and n[1:].isdigit()] == [
            f"t{i}" for i in range(limit)
        ]


# --- strided inputs ---------------------------------------------------------------------------


def _same_storage(view: torch.Tensor, base: torch.Tensor) -> bool:
    return view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rows_with_a_larger_row_stride(backend):
    rows, c = small(backend, 12), 45
    big_s, big_t = torch.randn(rows, 3 * c), torch.randn(rows, 2 * c + 3)
    s, t = big_s[:, c : 2 * c], big_t[:, 3 : c + 3]
    y = torch.randint(0, c, (rows,))
    for x, base in ((s, big_s), (t, big_t)):
        v = as_rows3d(x)
        assert v.shape == (rows, 1, c) and _same_storage(v, base) and v.data_ptr() == x.data_ptr()
    check_against_reference(backend, s, t, y, alpha=0.5, temperature=2.0)
    if backend in FUSED:
        with OpLog() as log:
            fastkd.kd_loss(s.requires_grad_(), t, y, alpha=0.5, backend=backend)
        assert log.copies(s.numel()) == [], "strided rows must reach the kernel without a copy"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_token_logits_shifted_slice(backend):
    b, l, c = (2, 3, 53) if backend == "triton" else (3, 9, 53)
    logits_s, logits_t = torch.randn(b, l, c), torch.randn(b, l, c)
    tokens = torch.randint(0, c, (b, l))
    tokens[0, 2] = IGNORE
    s, t, y = logits_s[:, :-1], logits_t[:, :-1], tokens[:, 1:]
    v = as_rows3d(s)
    assert v.shape == (b, l - 1, c) and v.stride() == (l * c, c, 1)
    assert v.data_ptr() == s.data_ptr() and _same_storage(v, logits_s)
    kw = dict(alpha=0.5, temperature=2.0, label_smoothing=0.1)
    check_against_reference(backend, s, t, y, **kw)
    check_against_reference(backend, s, t, y, reduction="none", **kw)
    if backend in FUSED:
        with OpLog() as log:
            fastkd.kd_loss(s.requires_grad_(), t, y, backend=backend, **kw)
        assert log.copies(s.numel()) == [], "a [B, L, C] slice must reach the kernel as a view"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_4d_logits(backend):
    a, b, l, c = (2, 2, 2, 31) if backend == "triton" else (3, 4, 5, 31)
    x_s, x_t = torch.randn(a, b, l + 1, c), torch.randn(a, b, l + 1, c)
    y = torch.randint(0, c, (a, b, l + 1))
    # Leading dims that fold into one stride: a view, as as_rows3d's docstring promises.
    s, t, yy = x_s[:, :, 1:], x_t[:, :, :-1], y[:, :, 1:]
    v = as_rows3d(s)
    assert v.shape == (a * b, l, c) and v.data_ptr() == s.data_ptr() and _same_storage(v, x_s)
    check_against_reference(backend, s, t, yy, alpha=0.5)
    # A slice of the second dim: leading dims that do not fold into one stride are copied.
    s, t, yy = x_s[:, 1:], x_t[:, :-1], y[:, 1:]
    check_against_reference(backend, s, t, yy, guided=True, temperature=2.0)
    # Permuted leading dims cannot be folded: copied, and still right.
    s, t, yy = x_s.transpose(0, 1), x_t.transpose(0, 1), y.transpose(0, 1)
    check_against_reference(backend, s, t, yy, alpha=0.5, temperature=3.0)
    check_against_reference(backend, s, t, yy, alpha=0.5, reduction="none")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_class_dim_and_broadcast_teacher(backend):
    rows, c = small(backend, 6), 29
    s = torch.randn(c, rows).t()  # class stride != 1: copied by as_rows3d
    t = torch.randn(1, c).expand(rows, c)  # one teacher row shared by every row (stride 0)
    assert as_rows3d(t).data_ptr() == t.data_ptr()
    check_against_reference(backend, s, t, None, temperature=2.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_labels(backend):
    rows, c = small(backend, 8), 19
    s, ts, _ = make_inputs((rows, c), labels=False)
    table = torch.randint(0, c, (rows, 3))
    table[1, 1] = IGNORE
    for y in (table[:, 1], table[:, 1].int(), table.t()[1]):
        check_against_reference(backend, s, ts[0], y, alpha=0.5, temperature=2.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_reaches_the_base_of_a_slice(backend):
    rows, c = small(backend, 5), 23
    big = torch.randn(rows, 2 * c, requires_grad=True)
    t = torch.randn(rows, c)
    fastkd.kd_loss(big[:, c:], t, temperature=2.0, backend=backend).backward()
    _, ref = reference_grad(big[:, c:], t, temperature=2.0)
    assert torch.equal(big.grad[:, :c], torch.zeros(rows, c))
    assert_grad_close(big.grad[:, c:], ref, F32)


# --- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["batchmean", "none", "sum"])
@pytest.mark.parametrize("grad_scale", [2.5, -0.75, 0.0])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backward_is_scaled_by_grad_output(backend, grad_scale, reduction):
    s, ts, y = make_inputs((small(backend, 7), 33), ignore=True)
    check_against_reference(backend, s, ts[0], y, grad_scale=grad_scale, alpha=0.5,
                            temperature=2.0, reduction=reduction)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_weighted_sum_of_per_row_losses(backend):
    s, ts, y = make_inputs((2, small(backend, 3), 17), ignore=True)
    w = torch.rand(s.shape[:-1])
    x = s.clone().requires_grad_(True)
    loss = fastkd.kd_loss(x, ts[0], y, alpha=0.3, reduction="none", backend=backend)
    (loss * w).sum().backward()
    x64 = s.double().requires_grad_(True)
    ref = fastkd.reference.kd_loss_ref(x64, ts[0].double(), y, alpha=0.3, reduction="none")
    (ref * w.double()).sum().backward()
    assert_grad_close(x.grad, x64.grad, F32)
    # none.sum() seeds every row with 1 (an expanded, stride-0 grad_output).
    x.grad = None
    fastkd.kd_loss(x, ts[0], y, alpha=0.3, reduction="none", backend=backend).sum().backward()
    _, ref_sum = reference_grad(s, ts[0], y, alpha=0.3, reduction="sum")
    assert_grad_close(x.grad, ref_sum, F32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_teacher_never_receives_a_gradient(backend):
    s, ts, y = make_inputs((small(backend, 6), 21), teachers=2, ignore=True)
    ts = [t.requires_grad_(True) for t in ts]
    x = s.clone().requires_grad_(True)
    fastkd.kd_loss(x, ts, y, alpha=0.5, temperature=2.0, backend=backend).backward()
    assert all(t.grad is None for t in ts)
    _, ref = reference_grad(s, [t.detach() for t in ts], y, alpha=0.5, temperature=2.0)
    assert_grad_close(x.grad, ref, F32)
    # A frozen student: nothing to differentiate, even though the teachers require grad.
    loss = fastkd.kd_loss(s, ts, y, alpha=0.5, backend=backend)
    assert not loss.requires_grad
    # The student as its own teacher (self-distillation): only the student slot is differentiated.
    x.grad = None
    fastkd.kd_loss(x, x * 1.5, backend=backend).backward()
    _, ref = reference_grad(s, s * 1.5)
    assert_grad_close(x.grad, ref, F32)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_gradient_is_computed_when_the_student_does_not_require_it(backend):
    s, ts, y = make_inputs((small(backend, 6), 21), ignore=True)
    kw = dict(alpha=0.5, temperature=2.0, backend=backend)
    with_grad = fastkd.kd_loss(s.clone().requires_grad_(True), ts[0], y, **kw)
    with OpLog() as log:
        frozen = fastkd.kd_loss(s, ts[0], y, **kw)
        with torch.no_grad():
            no_grad = fastkd.kd_loss(s.clone().requires_grad_(True), ts[0], y, **kw)
    assert not frozen.requires_grad and frozen.grad_fn is None and no_grad.grad_fn is None
    assert torch.equal(frozen, with_grad.detach()) and torch.equal(no_grad, frozen)
    calls = log.kd_calls()
    if backend == "torch":
        assert calls == []
    else:
        # args[11]: compute_grad (the sparse teachers' three lists follow it)
        assert len(calls) == 2 and all(args[11] is False for args in calls)
        grads = [out[1] for name, _, out in log.calls if name in KD_OPS]
        assert all(g.numel() == 0 for g in grads), "compute_grad=False must not write a gradient"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_student_from_a_layer_and_used_twice(backend):
    rows, d, c = small(backend, 6), 8, 27
    layer = torch.nn.Linear(d, c).double()
    x = torch.randn(rows, d, dtype=F64)
    t1, t2 = torch.randn(rows, c), torch.randn(rows, c)
    y = torch.randint(0, c, (rows,))

    def total(fn, dtype, **extra):
        s = layer(x).to(dtype)
        return fn(s, t1.to(dtype), y, alpha=0.5, **extra) + 0.5 * fn(s, t2.to(dtype), **extra) + (
            s.square().mean()
        )

    total(fastkd.kd_loss, F32, backend=backend).backward()
    got = layer.weight.grad.clone()
    layer.zero_grad()
    total(fastkd.reference.kd_loss_ref, F64).backward()
    assert_grad_close(got.float(), layer.weight.grad, F32)


@pytest.mark.parametrize("backend", FUSED)
def test_second_backward_never_returns_a_wrong_gradient(backend):
    s, ts, y = make_inputs((small(backend, 5), 19), ignore=True)
    _, ref = reference_grad(s, ts[0], y, alpha=0.5, grad_scale=2.5)
    x = s.clone().requires_grad_(True)
    loss = fastkd.kd_loss(x, ts[0], y, alpha=0.5, backend=backend)
    (2.5 * loss).backward(retain_graph=True)
    assert_grad_close(x.grad, ref, F32)
    # The first backward scaled the saved gradient in place; reusing it must be refused.
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (2.5 * loss).backward()
    # With grad_output exactly 1 the saved gradient may be left as it was: a second backward then
    # either is refused or accumulates the right gradient again.
    x.grad = None
    loss = fastkd.kd_loss(x, ts[0], y, alpha=0.5, backend=backend)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    try:
        loss.backward()
    except RuntimeError as e:
        assert "modified by an inplace operation" in str(e)
    else:
        assert torch.equal(x.grad, 2 * first)


@pytest.mark.parametrize(
    "op", ["kd_loss_fwd"] + (["kd_loss_fwd_triton"] if "triton" in CPU_BACKENDS else [])
)
@pytest.mark.parametrize("compute_grad", [False, True])
def test_direct_op_call_is_not_differentiable(op, compute_grad):
    """The ops are not differentiable (fastkd.kd_loss differentiates them with an
    autograd.Function); called directly on a student that requires grad, a backward through
    either output must fail loudly rather than return no or a zero gradient."""
    s = torch.randn(3, 1, 7, requires_grad=True)
    loss, grad = getattr(torch.ops.fastkd, op)(
        s, [torch.randn(3, 1, 7)], None, None, None, [1.0], 0.0, 1.0, 0.0, IGNORE, False,
        compute_grad, [], [], [],
    )
    assert (grad.numel() == 0) != compute_grad
    with pytest.raises(RuntimeError, match="not implemented|no autograd formula"):
        loss.backward()
    assert s.grad is None


# --- extreme values ---------------------------------------------------------------------------


def _masked(shape, masked_cols, scale=3.0):
    s, t = torch.randn(shape) * scale, torch.randn(shape) * scale
    s[..., masked_cols] = -math.inf
    t[..., masked_cols] = -math.inf
    return s, t


EXTREME_CASES = ["huge_logits", "tiny_temperature", "huge_temperature", "masked_vocab",
                 "masked_vocab_ce", "teacher_rules_out", "huge_logits_half"]


@pytest.mark.parametrize("case", EXTREME_CASES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_extreme_values(backend, case):
    rows, c = small(backend, 6), 40
    y = torch.randint(3, c, (rows,))
    kw: dict = {}
    if case in ("huge_logits", "tiny_temperature", "huge_temperature", "huge_logits_half"):
        s, t = torch.randn(rows, c) * 1e4, torch.randn(rows, c) * 1e4
        s[:, 0], t[:, 0] = 1e4, -1e4
        kw = {"huge_logits": {"alpha": 0.5, "label_smoothing": 0.1},
              "tiny_temperature": {"temperature": 0.05},
              "huge_temperature": {"temperature": 50.0, "alpha": 0.9},
              "huge_logits_half": {"alpha": 0.5}}[case]
        if case == "huge_logits_half":
            s, t = s.clamp(-6e4, 6e4).half(), t.clamp(-6e4, 6e4).bfloat16()
    elif case == "masked_vocab":
        s, t = _masked((rows, c), [1, 2, c - 1])
        kw = {"temperature": 2.0, "guided": True}
    elif case == "masked_vocab_ce":  # CE at T != 1 and T = 1 over a masked vocabulary
        s, t = _masked((rows, c), [1, 2, c - 1])
        y = y.clamp_max(c - 2)  # labels are never masked classes (their CE would be inf)
        for temperature in (1.0, 2.0):
            loss, grad = check_against_reference(backend, s, t, y, alpha=0.4,
                                                 temperature=temperature)
            assert torch.isfinite(loss) and torch.isfinite(grad).all()
        return
    else:  # the teacher rules classes out where the student does not
        s, t = torch.randn(rows, c), torch.randn(rows, c)
        t[:, :5] = -math.inf
        t[0, 6:] = -math.inf  # a one-hot teacher row
        kw = {"temperature": 1.5, "alpha": 0.7}
    loss, grad = check_against_reference(backend, s, t, y, **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    loss, _ = check_against_reference(backend, s, t, y, reduction="none", **kw)
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("backend", FUSED)
def test_common_offset_keeps_gradient_precision(backend, temperature):
    """Logits with a large common offset (softmax ignores it): the exponentials must see x - max
    computed before any scaling, so the gradient keeps float32's relative precision instead of
    losing it to the offset's size (about 1e-4 at |max| / T = 2000 if the offset is folded into
    the scale)."""
    rows, c = small(backend, 8), 300
    g = torch.Generator().manual_seed(7)
    s = torch.randn(rows, c, generator=g) * 3 + 1000
    t = torch.randn(rows, c, generator=g) * 3 + 1000
    kw = {"temperature": temperature}
    _, grad = backend_grad(backend, s, t, **kw)
    _, ref = reference_grad(s, t, **kw)
    err = (grad.double() - ref).abs().max() / ref.abs().max()
    assert err < 2e-5, f"relative gradient error {err:.1e}"


@pytest.mark.parametrize("kw", [{"alpha": 0.5}, {"guided": True}, {"alpha": 0.7, "guided": True}])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rows_that_count_nowhere_get_zero_whatever_their_values(backend, kw):
    """Ignored rows (padding) may hold -inf, float32's lowest value or NaN everywhere: they add
    nothing to the loss and get an exactly zero gradient, on every backend."""
    c = 37
    s, t = torch.randn(5, c) * 2, torch.randn(5, c) * 2
    s[1] = t[1] = -math.inf
    s[2] = t[2] = torch.finfo(torch.float32).min
    s[3] = t[3] = math.nan
    y = torch.tensor([int(t[0].argmax()), IGNORE, IGNORE, IGNORE, int(t[4].argmax())])
    loss, grad = backend_grad(backend, s, t, y, temperature=2.0, **kw)
    kept = [0, 4]
    loss_kept, grad_kept = backend_grad(backend, s[kept], t[kept], y[kept], temperature=2.0, **kw)
    torch.testing.assert_close(loss, loss_kept, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad[kept], grad_kept, rtol=1e-6, atol=0)
    assert torch.equal(grad[1:4], torch.zeros(3, c)), grad[1:4]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lowest_float_row_is_uniform(backend):
    """A counted row filled with float32's lowest value is a uniform distribution like any other
    constant row (no running-maximum sentinel may be mistaken for it)."""
    c = 37
    s, t = torch.randn(3, c), torch.randn(3, c)
    s[1] = t[1] = torch.finfo(torch.float32).min
    loss, grad = check_against_reference(backend, s, t, temperature=2.0, reduction="none")
    assert loss[1] == 0 and torch.isfinite(grad).all()


@pytest.mark.parametrize("kw", [{}, {"alpha": 0.5}, {"alpha": 0.5, "label_smoothing": 0.1}])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_common_offset_keeps_loss_precision(backend, kw):
    """The loss of logits with a large common offset: log-sum-exps are combined with the maxima
    cancelled first, so the error stays at float32's relative precision of the loss itself."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 200, generator=g) * 3 + 1e4
    t = torch.randn(6, 200, generator=g) * 3 + 1e4
    y = torch.randint(0, 200, (6,), generator=g)
    loss = fastkd.kd_loss(s, t, y, temperature=1.0, backend=backend, **kw)
    ref = fastkd.reference.kd_loss_ref(s.double(), t.double(), y, temperature=1.0, **kw)
    # label smoothing averages the raw logits, whose float32 sum is only good to ~1e-7 of 1e4.
    tol = 1e-4 if "label_smoothing" in kw else 1e-5
    assert abs(loss.double() - ref) / ref.abs() < tol, (loss.item(), ref.item())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_small_kl_keeps_absolute_precision(backend):
    """Nearly equal student and teacher (logits of size 0.01, KL ~1e-4): every backend computes
    KL as sum p (t - s) / T plus the difference of the log-sum-exps with the maxima cancelled, so
    the error is a few float32 ulps of log C (measured 1.1e-7 on the C++ kernel, 6e-8 on the torch
    backend), not ulps of the separately rounded log-softmaxes."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 100, generator=g) * 0.01
    t = torch.randn(16, 100, generator=g) * 0.01
    y = t.argmax(-1)
    y[::3] = 0
    loss = fastkd.kd_loss(s, t, y, guided=True, backend=backend)
    ref = fastkd.reference.kd_loss_ref(s.double(), t.double(), y, guided=True)
    assert abs(loss.double() - ref) < 5e-7, (loss.item(), ref.item())


@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_logit_gives_nan_loss(backend, where):
    """A NaN logit makes its row's loss NaN, as in the reference; the exponentials' clamping of
    -inf arguments must not turn it into a finite number."""
    rows, c = small(backend, 4), 37
    s, t = torch.randn(rows, c), torch.randn(rows, c)
    (s if where == "student" else t)[1, 5] = math.nan
    loss = fastkd.kd_loss(s, t, temperature=2.0, reduction="none", backend=backend)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all(), loss
    assert torch.isnan(fastkd.kd_loss(s, t, temperature=2.0, backend=backend))


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_guided_teacher_never_right_gives_zero(backend, reduction):
    rows, c = small(backend, 6), 30
    ts = [torch.randn(rows, c) for _ in range(2)]
    y = (ts[0].argmax(-1) + 1) % c
    ts[1][torch.arange(rows), y] = -math.inf  # never right either
    for alpha in (None, 1.0):
        loss, grad = backend_grad(backend, torch.randn(rows, c) * 3, ts, y, guided=True,
                                  alpha=alpha, reduction=reduction)
        assert torch.equal(loss, torch.zeros_like(loss)), loss
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_rows_ignored_gives_zero(backend, reduction):
    rows, c = small(backend, 5), 30
    s, ts, _ = make_inputs((rows, c), teachers=2, labels=False)
    y = torch.full((rows,), IGNORE)
    for kw in ({"alpha": 0.5, "label_smoothing": 0.1}, {"guided": True}, {}):
        loss, grad = backend_grad(backend, s, ts, y, reduction=reduction, **kw)
        assert torch.equal(loss, torch.zeros_like(loss)), (kw, loss)
        assert torch.equal(grad, torch.zeros_like(grad)), kw


# --- determinism ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bitwise_deterministic(backend):
    s, ts, y = make_inputs((small(backend, 64), 509), teachers=2, ignore=True, guided_hits=True)
    kw = dict(alpha=0.3, temperature=2.0, label_smoothing=0.1, teacher_weights=[0.5, 1.5])
    first = backend_grad(backend, s, ts, y, **kw)
    for _ in range(2):
        again = backend_grad(backend, s, ts, y, **kw)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("dtype", [F32, BF16, F64])
def test_cpu_kernel_across_thread_counts(dtype):
    # 256 rows of 512 classes: at::parallel_for splits them (grain 32 rows) over the threads.
    s, ts, y = make_inputs((256, 512), dtype, teachers=2, ignore=True)
    kw = dict(alpha=0.3, temperature=2.0, teacher_weights=[1.0, 0.5])
    results = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        results.append(backend_grad("cpu", s, ts, y, **kw))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])
    torch.set_num_threads(1)  # for the reference (see kd_helpers._seed)
    ref_loss, ref_grad = reference_grad(s, ts, y, **kw)
    assert_loss_close(results[1][0], ref_loss, dtype)
    assert_grad_close(results[1][1], ref_grad, dtype)


# --- the module -------------------------------------------------------------------------------


def test_kdloss_repr():
    assert repr(fastkd.nn.KDLoss()) == "KDLoss(temperature=1.0)"
    full = fastkd.nn.KDLoss(temperature=4, alpha=0.9, label_smoothing=0.1, guided=True,
                            teacher_weights=(1, 2), reduction="sum", backend="cpu")
    assert repr(full) == (
        "KDLoss(temperature=4.0, alpha=0.9, label_smoothing=0.1, guided=True, "
        "teacher_weights=[1.0, 2.0], reduction='sum', backend='cpu')"
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kdloss_module_matches_functional(backend):
    s, ts, y = make_inputs((small(backend, 6), 25), teachers=2, ignore=True, guided_hits=True)
    kw = dict(temperature=2.0, alpha=0.4, label_smoothing=0.1, guided=True,
              teacher_weights=[0.5, 2.0], reduction="sum")
    criterion = fastkd.nn.KDLoss(backend=backend, **kw)
    assert list(criterion.parameters()) == [] and criterion.state_dict() == {}
    x = s.clone().requires_grad_(True)
    criterion(x, ts, y).backward()
    loss, grad = backend_grad(backend, s, ts, y, **kw)
    assert torch.equal(criterion(s, ts, y), loss) and torch.equal(x.grad, grad)
    check_against_reference(backend, s, ts, y, **kw)
    # Defaults: plain KD, labels optional.
    assert torch.equal(fastkd.nn.KDLoss(backend=backend)(s, ts[0]),
                       fastkd.kd_loss(s, ts[0], backend=backend))
