"""fastkd.kd_loss with sparse (top-k) teachers, ``fastkd.SparseTeacher``, on every backend of this
machine that takes them, against the float64 dense reference of the definition.

The oracle densifies here, independently of the library: ``d[ids] = values`` (``log(values)`` for
probabilities), every other class ``log(m / (C - k))`` with ``m = max(0, 1 - sum of the k
probabilities)`` (tail "uniform") or ``-inf`` (tail "none"), computed in float64 from the same
(rounded) ids and values; ``fastkd.reference.kd_loss_ref`` then runs on ``d`` as on any dense
teacher. Backends that do not take sparse teachers yet (``SPARSE_SUPPORT``) are skipped, so the
Triton interpreter and the GPU runs join as soon as their kernels do.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import CPU_BACKENDS
from hypothesis import given
from hypothesis import strategies as st
from kd_helpers import (
    IGNORE,
    INTERPRETER_NOISE,
    _grad_scale_bound,
    _seed,  # noqa: F401  (autouse fixture)
    backend_grad,
    leaf_like,
    reference_grad,
)
from tolerances import assert_grad_close, assert_loss_close

import fastkd
from fastkd import SparseTeacher
from fastkd.functional.kd_loss import SPARSE_SUPPORT, _choose_backend, _sparse_argmax

pytestmark = INTERPRETER_NOISE

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


def _takes_sparse(backend: str) -> bool:
    return backend == "torch" or SPARSE_SUPPORT[backend] is None


BACKENDS = tuple(b for b in CPU_BACKENDS if _takes_sparse(b))
FUSED = tuple(b for b in BACKENDS if b != "torch")


def small(backend: str, rows: int) -> int:
    """Fewer rows under the Triton interpreter (~10 ms a row and teacher)."""
    return min(rows, 4) if backend == "triton" else rows


# --- the oracle: the dense teacher of the definition, float64 -------------------------------


def densify(t: SparseTeacher, classes: int) -> torch.Tensor:
    """``d`` of the definition, ``[..., C]`` float64."""
    ids, v = t.indices.long(), t.values.double()
    k = ids.shape[-1]
    logv = v.log() if t.kind == "probs" else v
    if t.tail == "none" or k == classes:
        tail = torch.full(v.shape[:-1], -math.inf, dtype=F64)
    else:
        probs = v if t.kind == "probs" else v.exp()
        m = (1.0 - probs.sum(-1)).clamp_min(0.0)
        tail = torch.log(m / (classes - k))
    d = tail[..., None].expand(*v.shape[:-1], classes).clone()
    return d.scatter(-1, ids, logv)


def dense_of(teachers, classes: int):
    if isinstance(teachers, (list, tuple)):
        return [densify(t, classes) if isinstance(t, SparseTeacher) else t for t in teachers]
    return densify(teachers, classes) if isinstance(teachers, SparseTeacher) else teachers


def check_sparse(backend, student, teachers, labels=None, *, msg="", **kw):
    """The backend's loss and gradient against the float64 reference on the densified teachers
    (the tolerance table of the student's dtype); returns the backend's (loss, grad)."""
    loss, grad = backend_grad(backend, student, teachers, labels, **kw)
    dense = dense_of(teachers, student.shape[-1])
    ref_loss, ref_grad = reference_grad(student, dense, labels, **kw)
    what = f"[{backend}, {student.dtype}, {tuple(student.shape)}, {kw}] {msg}"
    assert loss.dtype == (F64 if student.dtype == F64 else F32), what
    assert loss.shape == (student.shape[:-1] if kw.get("reduction") == "none" else ()), what
    assert_loss_close(loss, ref_loss, student.dtype, what)
    assert_grad_close(grad, ref_grad, student.dtype, what, min_scale=0.1 * _grad_scale_bound(
        student, dense if isinstance(dense, list) else [dense], 1.0, **kw))
    # Forward only (no gradient asked for): the same loss.
    with torch.no_grad():
        plain = fastkd.kd_loss(student, teachers, labels, backend=backend, **kw)
    assert_loss_close(plain, ref_loss, student.dtype, what + " (forward only)")
    return loss, grad


# --- inputs -----------------------------------------------------------------------------------


def random_ids(lead, classes: int, k: int, dtype=torch.int64) -> torch.Tensor:
    """k distinct class ids per row, in random order."""
    rows = math.prod(lead)
    ids = torch.rand(rows, classes).argsort(-1)[:, :k]
    return ids.reshape(*lead, k).to(dtype)


def sparse_teacher(lead, classes, k, kind="log_probs", tail="uniform", vdtype=F32, idtype=None,
                   *, top=False, scale=2.0) -> SparseTeacher:
    """A sparse teacher drawn from a random dense one: its top k classes (``top``) or k random
    ones, with values of `kind` rounded to `vdtype`."""
    t = torch.randn(*lead, classes, dtype=F64) * scale
    if top:
        ids = t.topk(k, dim=-1).indices
    else:
        ids = random_ids(lead, classes, k)
    chosen = t.gather(-1, ids)
    if kind == "logits":
        values = chosen
    else:
        log_p = torch.log_softmax(t, -1).gather(-1, ids)
        values = log_p if kind == "log_probs" else log_p.exp()
    idtype = idtype or (torch.int32 if k % 2 else torch.int64)
    return SparseTeacher(ids.to(idtype), values.to(vdtype), kind=kind, tail=tail)


def student_and_labels(lead, classes, dtype=F32, *, ignore=False, scale=2.0):
    s = (torch.randn(*lead, classes) * scale).to(dtype)
    y = torch.randint(0, classes, tuple(lead))
    if ignore:
        y.view(-1)[1::3] = IGNORE
    return s, y


def make_guided_hits(y: torch.Tensor, t: SparseTeacher) -> SparseTeacher:
    """Makes the teacher right (its argmax the label) on every other row: the label is set to the
    row's id of largest value where that id is the argmax of d (values above the tail)."""
    flat_y = y.view(-1)
    ids = t.indices.reshape(-1, t.k)
    best = t.values.reshape(-1, t.k).float().argmax(-1)
    for b in range(0, flat_y.numel(), 2):
        if flat_y[b] != IGNORE:
            flat_y[b] = ids[b, best[b]]
    return t


KIND_TAILS = [("log_probs", "uniform"), ("probs", "uniform"), ("log_probs", "none"),
              ("probs", "none"), ("logits", "none")]
KS = [1, 5, 64, "C-1", "C"]
OPTIONS = [
    {},
    {"temperature": 4.0},
    {"temperature": 2.0, "alpha": 0.3, "label_smoothing": 0.1},
    {"guided": True, "alpha": 0.5, "temperature": 1.5},
    {"reduction": "sum", "temperature": 3.0},
    {"reduction": "mean", "alpha": 0.7, "temperature": 2.0},
    {"reduction": "none", "temperature": 2.0, "alpha": 0.5},
    {"guided": True, "reduction": "none"},
]
# (student dtype, values dtype, ids dtype), sampled across the grid.
DTYPES = [(F32, F32, torch.int64), (BF16, BF16, torch.int32), (F16, F16, torch.int64),
          (F32, BF16, torch.int32), (BF16, F32, torch.int64), (F16, F32, torch.int32),
          (F32, F16, torch.int32)]
GRID = [
    (i, kind, tail, k, OPTIONS[i % len(OPTIONS)], DTYPES[(3 * i) % len(DTYPES)])
    for i, ((kind, tail), k) in enumerate(itertools.product(KIND_TAILS, KS))
]


@pytest.mark.parametrize("index,kind,tail,k,kw,dtypes", GRID,
                         ids=[f"{g[1]}-{g[2]}-k{g[3]}-{g[0]}" for g in GRID])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_dense_definition(backend, index, kind, tail, k, kw, dtypes):
    sdtype, vdtype, idtype = dtypes
    classes = 1271
    k = {"C-1": classes - 1, "C": classes}.get(k, k)
    lead = (small(backend, 41),)
    torch.manual_seed(index)
    s, y = student_and_labels(lead, classes, sdtype, ignore=index % 2 == 1)
    # Half the cases keep the top k (the use case; the tail is then below every value), half k
    # random classes (the tail may exceed values).
    t = sparse_teacher(lead, classes, k, kind, tail, vdtype, idtype, top=index % 2 == 0)
    if kw.get("guided"):
        make_guided_hits(y, t)
    labels = y if (kw or index % 2) else None
    check_sparse(backend, s, t, labels, **kw)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cohort_mixing_dense_and_sparse(backend, reduction):
    """Sparse teachers before, between and after dense ones, with weights, guided KD and CE: the
    kernels take dense teachers first, so the weights and guided rows must follow the reorder."""
    lead, classes = (small(backend, 9),), 257
    s, y = student_and_labels(lead, classes, ignore=True)
    teachers = [
        sparse_teacher(lead, classes, 8, "log_probs", "uniform", top=True),
        (torch.randn(*lead, classes) * 2).to(BF16),
        sparse_teacher(lead, classes, 3, "logits", "none", BF16),
        torch.randn(*lead, classes) * 2,
        sparse_teacher(lead, classes, 40, "probs", "uniform", F16),
    ]
    for t in teachers[::2]:
        make_guided_hits(y, t)
    weights = [0.7, 1.6, 0.4, 1.0, 2.0]
    for guided in (False, True):
        check_sparse(backend, s, teachers, y, temperature=2.5, alpha=0.6, label_smoothing=0.05,
                     guided=guided, teacher_weights=weights, reduction=reduction,
                     msg=f"guided={guided}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cohort_of_sparse_teachers_only(backend):
    lead, classes = (small(backend, 7),), 100
    s, y = student_and_labels(lead, classes)
    ts = [sparse_teacher(lead, classes, k, top=True) for k in (1, 10, 99)]
    check_sparse(backend, s, ts, y, temperature=2.0, teacher_weights=[0.5, 1.0, 1.5])


SHAPES = {
    "one_row": ((1,), 50, 7),
    "vector": ((), 77, 9),
    "tokens": ((3, 5), 97, 16),
    "4d": ((2, 3, 2), 33, 4),
    "wide": ((2,), 32768, 64),
    "wide_dense_k": ((1,), 32768, 32768),
}


@pytest.mark.parametrize("mixed", [False, True], ids=["kd", "mixed"])
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes(backend, name, mixed):
    lead, classes, k = SHAPES[name]
    if backend == "triton":
        lead = tuple(min(d, 2) for d in lead)
    s, y = student_and_labels(lead, classes, ignore=mixed and math.prod(lead) > 2)
    t = sparse_teacher(lead, classes, k, top=True)
    kw = {"temperature": 2.0, "alpha": 0.5, "label_smoothing": 0.1} if mixed else {}
    labels = y if mixed else None
    check_sparse(backend, s, t, labels, **kw)
    loss, _ = check_sparse(backend, s, t, labels, reduction="none", **kw)
    assert loss.shape == torch.Size(lead)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_ids_values_and_student(backend):
    """Ids and values read through slices and transposes, a student with a larger row stride and
    token logits shifted by one position (no copy required of the caller)."""
    rows, classes, k = small(backend, 6), 301, 12
    base = sparse_teacher((rows,), classes, k, top=True)
    ids_t = torch.empty(k, rows, dtype=torch.int32)
    ids_t.copy_(base.indices.t())
    wide_values = torch.randn(rows, 3 * k)
    wide_values[:, ::3] = base.values
    t = SparseTeacher(ids_t.t(), wide_values[:, ::3], kind=base.kind, tail=base.tail)
    assert not t.indices.is_contiguous() and not t.values.is_contiguous()
    wide = torch.randn(rows, classes + 17) * 2
    s = wide[:, 5 : 5 + classes]
    y = torch.randint(0, classes, (rows,))
    check_sparse(backend, s, t, y, temperature=2.0, alpha=0.5)

    # Token logits [B, L, C] sliced to L - 1 positions, with matching [B, L - 1, k] slices.
    B, L = (2, 4) if backend == "triton" else (3, 6)
    tokens = torch.randn(B, L, classes) * 2
    tt = sparse_teacher((B, L), classes, k, "probs", "uniform", top=True)
    shifted = SparseTeacher(tt.indices[:, 1:], tt.values[:, 1:], kind="probs")
    check_sparse(backend, tokens[:, :-1], shifted, torch.randint(0, classes, (B, L - 1)),
                 alpha=0.8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64(backend):
    if backend not in ("cpu", "torch"):
        pytest.skip("float64 runs on the CPU backends")
    lead, classes = (5,), 40
    s, y = student_and_labels(lead, classes, F64, ignore=True)
    for kind, tail in KIND_TAILS:
        t = sparse_teacher(lead, classes, 6, kind, tail, F64)
        check_sparse(backend, s, [t, torch.randn(5, classes, dtype=F64)], y, temperature=3.0,
                     alpha=0.4, guided=True, msg=kind + tail)


# --- guided KD: the argmax of d, ties to the lowest class -------------------------------------


def test_sparse_argmax_tie_rules():
    inf = math.inf
    ids = torch.tensor([[7, 3], [7, 3], [0, 2], [2, 3], [0, 1], [1, 0], [4, 1]], dtype=torch.int32)
    values = torch.tensor([
        [-1.0, -1.0],   # tie between two ids: the lower id, 3
        [-0.5, -1.0],   # one id wins: 7
        [-2.0, -3.0],   # the tail (-1) exceeds every value: the first class not in ids, 1
        [-1.0, -1.0],   # tail ties the values: the lowest of ids and missing classes, 0
        [-1.0, -1.0],   # tail ties, ids 0 and 1 present: 0
        [-1.0, -2.0],   # tail ties the best value (id 1) and class 2 is missing: 1
        [-inf, -inf],   # every entry -inf: class 0, as argmax of an all -inf row
    ])
    tails = torch.tensor([-9.0, -9.0, -1.0, -1.0, -1.0, -1.0, -inf])
    got = _sparse_argmax(ids, values, tails, 8)
    assert got.tolist() == [3, 7, 1, 0, 0, 1, 0]
    dense = tails[:, None].expand(-1, 8).clone().scatter(-1, ids.long(), values)
    assert got.tolist() == dense.argmax(-1).tolist()
    # k == C: no tail class.
    ids = torch.tensor([[2, 0, 1]], dtype=torch.int32)
    got = _sparse_argmax(ids, torch.tensor([[0.0, 0.0, -1.0]]), torch.tensor([-inf]), 3)
    assert got.tolist() == [0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_guided_when_the_tail_exceeds_the_values(backend):
    """Row 0: probabilities 0.1 and 0.1 on ids 0 and 2 of C = 4 leave 0.4 each to classes 1 and 3,
    so d's argmax is 1 (a tail class, the lowest); row 1: values tie on ids 3 and 1, argmax 1;
    row 2: 0.6 on id 2 wins. A label on the argmax counts, a label on an id does not."""
    ids = torch.tensor([[0, 2], [3, 1], [2, 0]])
    probs = torch.tensor([[0.1, 0.1], [0.3, 0.3], [0.6, 0.1]])
    t = SparseTeacher(ids, probs, kind="probs")
    s = torch.randn(3, 4)
    for labels, hits in ([1, 1, 2], [True] * 3), ([0, 3, 0], [False] * 3), ([3, 1, 2], None):
        y = torch.tensor(labels)
        loss, _ = check_sparse(backend, s, t, y, guided=True, reduction="none", temperature=2.0)
        if hits is not None:
            assert ((loss != 0) == torch.tensor(hits)).all(), (labels, loss)


# --- properties ---------------------------------------------------------------------------------


@st.composite
def sparse_cases(draw, dtype):
    rows = draw(st.integers(1, 5))
    classes = draw(st.integers(1, 40))
    k = draw(st.integers(1, classes))
    kind, tail = draw(st.sampled_from(KIND_TAILS))
    scale = draw(st.sampled_from([0.01, 1.0, 4.0, 20.0]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    s = (torch.randn(rows, classes, generator=gen, dtype=F64) * scale).to(dtype)
    t = torch.randn(rows, classes, generator=gen, dtype=F64) * scale
    ids = torch.rand(rows, classes, generator=gen).argsort(-1)[:, :k]
    chosen = t.gather(-1, ids) if kind == "logits" else torch.log_softmax(t, -1).gather(-1, ids)
    values = chosen.exp() if kind == "probs" else chosen
    teacher = SparseTeacher(ids, values.to(dtype), kind=kind, tail=tail)
    y = torch.randint(0, classes, (rows,), generator=gen)
    kw = draw(st.sampled_from(OPTIONS))
    return s, teacher, y, dict(kw)


PROPERTY_CONFIGS = [(b, d) for b in BACKENDS if b != "triton" for d in (F64, F32)
                    if not (d == F64 and b not in ("cpu", "torch"))]


@pytest.mark.parametrize("backend,dtype", PROPERTY_CONFIGS,
                         ids=[f"{b}-{str(d)[6:]}" for b, d in PROPERTY_CONFIGS])
@given(data=st.data())
def test_property_sparse_equals_dense_on_d(backend, dtype, data):
    """The sparse loss and gradient equal the same backend's on the dense d."""
    s, t, y, kw = data.draw(sparse_cases(dtype))
    d = densify(t, s.shape[-1]).to(dtype)
    sparse_loss, sparse_grad = backend_grad(backend, s, t, y, **kw)
    dense_loss, dense_grad = backend_grad(backend, s, d, y, **kw)
    assert_loss_close(sparse_loss, dense_loss, dtype, f"{kw}")
    assert_grad_close(sparse_grad, dense_grad, dtype, f"{kw}", min_scale=0.1 * _grad_scale_bound(
        s, [d], 1.0, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
@given(rows=st.integers(1, 4), classes=st.integers(1, 30), seed=st.integers(0, 2**31 - 1),
       temperature=st.sampled_from([0.5, 1.0, 3.0]))
def test_property_k_equals_c_without_tail_is_the_dense_teacher(backend, rows, classes, seed,
                                                               temperature):
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, classes, generator=gen) * 3
    t = torch.randn(rows, classes, generator=gen) * 3
    perm = torch.rand(rows, classes, generator=gen).argsort(-1)
    sparse = SparseTeacher(perm, t.gather(-1, perm), kind="logits", tail="none")
    a, ga = backend_grad(backend, s, sparse, temperature=temperature)
    b, gb = backend_grad(backend, s, t, temperature=temperature)
    assert_loss_close(a, b, F32)
    assert_grad_close(ga, gb, F32, min_scale=0.1 * temperature / rows)


# --- the module, from_logits and the kernel inputs ------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_takes_sparse_teachers(backend):
    s, y = student_and_labels((8,), 50, ignore=True)
    t = sparse_teacher((8,), 50, 5, top=True)
    crit = fastkd.nn.KDLoss(temperature=2.0, alpha=0.9, backend=backend)
    x = leaf_like(s)
    loss = crit(x, t, y)
    want = fastkd.kd_loss(s, t, y, temperature=2.0, alpha=0.9, backend=backend)
    torch.testing.assert_close(loss.detach(), want, rtol=0, atol=0)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_from_logits():
    t = torch.randn(4, 3, 30, dtype=F64) * 3
    for kind in ("log_probs", "probs", "logits"):
        top = SparseTeacher.from_logits(t.bfloat16(), 6, kind=kind)
        assert top.indices.shape == (4, 3, 6) and top.values.dtype == F32
        assert top.kind == kind and top.tail == ("none" if kind == "logits" else "uniform")
        tb = t.bfloat16().double()
        assert torch.equal(top.indices, tb.topk(6, -1).indices)
        want = {"logits": tb, "log_probs": torch.log_softmax(tb, -1),
                "probs": torch.softmax(tb, -1)}[kind].gather(-1, top.indices)
        torch.testing.assert_close(top.values.double(), want, rtol=1e-6, atol=1e-7)
    # A teacher whose top class holds all but 4e-13 of the mass keeps those digits: the uniform
    # tail of kd_loss is made of them.
    confident = torch.tensor([[30.0, 0.0, 0.0, 0.0, 0.0]])
    top = SparseTeacher.from_logits(confident, 1)
    assert math.isclose(top.values[0, 0].item(), -4 * math.exp(-30), rel_tol=1e-6)
    _, _, tails = top._for_kernel(5, F32)
    assert math.isclose(tails.item(), -30.0, rel_tol=1e-6)


def test_from_logits_matches_the_dense_teacher_for_k_equal_c():
    s, t = torch.randn(5, 20), torch.randn(5, 20) * 3
    top = SparseTeacher.from_logits(t, 20)
    a = fastkd.kd_loss(s, top, temperature=2.0, backend="torch")
    b = fastkd.kd_loss(s, t, temperature=2.0, backend="torch")
    assert_loss_close(a, b, F32)


def test_kernel_inputs():
    ids = torch.tensor([[[3, 1]], [[0, 2]]], dtype=torch.int64)        # [2, 1, 2]
    probs = torch.tensor([[[0.5, 0.25]], [[0.7, 0.3]]])
    for dtype in (F32, F64):
        for kind, values in (("probs", probs), ("log_probs", probs.log())):
            t = SparseTeacher(ids, values.to(dtype), kind=kind)
            i, v, tl = t._for_kernel(6, dtype)
            assert i.dtype == torch.int32 and i.shape == (2, 2) and i.is_contiguous()
            assert v.dtype == dtype and v.shape == (2, 2) and v.is_contiguous()
            assert tl.dtype == dtype and tl.shape == (2,)
            torch.testing.assert_close(v, probs.view(2, 2).log().to(dtype))
            # m = 0.25 spread over 4 classes; m = 0 (all mass in the k ids): -inf.
            assert math.isclose(tl[0].item(), math.log(0.25 / 4), rel_tol=1e-6)
            assert tl[1].item() == -math.inf or tl[1].item() < -15
    none = SparseTeacher(ids, probs, kind="probs", tail="none")._for_kernel(6, F32)[2]
    assert (none == -math.inf).all()
    full = SparseTeacher(ids, probs.log())._for_kernel(2, F32)[2]        # k == C
    assert (full == -math.inf).all()
    # Values above probability 1 in total leave no tail (m clamps at 0).
    over = SparseTeacher(ids, torch.full((2, 1, 2), 0.6), kind="probs")._for_kernel(6, F32)[2]
    assert (over == -math.inf).all()


def test_sparse_teacher_is_frozen_and_never_differentiated():
    values = torch.randn(3, 4).log_softmax(-1).requires_grad_(True)
    t = SparseTeacher(random_ids((3,), 10, 4), values.detach().clone().requires_grad_(True))
    with pytest.raises(AttributeError):
        t.kind = "probs"
    s = torch.randn(3, 10)
    loss = fastkd.kd_loss(s, t, backend="torch")
    assert not loss.requires_grad
    for backend in BACKENDS:
        x = s.clone().requires_grad_(True)
        fastkd.kd_loss(x, t, backend=backend).backward()
        assert t.values.grad is None


# --- backend choice ---------------------------------------------------------------------------


def test_backend_choice():
    s = torch.randn(3, 10)
    t = SparseTeacher.from_logits(torch.randn(3, 10), 2)
    assert _choose_backend(s, [t], "auto") == ("cpu" if SPARSE_SUPPORT["cpu"] is None else "torch")
    for backend in ("cuda", "triton"):
        if SPARSE_SUPPORT[backend] is not None:
            with pytest.raises(ValueError, match=f"{backend}: .*sparse teachers"):
                fastkd.kd_loss(s, t, backend=backend)
    # Nine teachers: past the kernels' limit, dense or sparse alike.
    assert _choose_backend(s, [t] * 9, "auto") == "torch"


# --- bad input --------------------------------------------------------------------------------

IDS = torch.tensor([[0, 3], [1, 2]])
VALS = torch.tensor([[-1.0, -2.0], [-1.5, -0.5]])

CONSTRUCTOR_ERRORS = [
    ("float ids", lambda: SparseTeacher(IDS.float(), VALS), TypeError, "indices must be an int32"),
    ("bool ids", lambda: SparseTeacher(IDS.bool(), VALS), TypeError, "indices"),
    ("int values", lambda: SparseTeacher(IDS, IDS), TypeError, "values must be a float32"),
    ("not tensors", lambda: SparseTeacher([[0]], VALS), TypeError, "indices must be a torch"),
    ("shape mismatch", lambda: SparseTeacher(IDS, VALS[:, :1]), ValueError, "one shape"),
    ("k == 0", lambda: SparseTeacher(IDS[:, :0], VALS[:, :0]), ValueError, "k >= 1"),
    ("0-d", lambda: SparseTeacher(IDS[0, 0], VALS[0, 0]), ValueError, "last dim"),
    ("kind", lambda: SparseTeacher(IDS, VALS, kind="logprobs"), ValueError, "kind must be one"),
    ("tail", lambda: SparseTeacher(IDS, VALS, tail="rest"), ValueError, "tail must be one"),
    ("uniform logits", lambda: SparseTeacher(IDS, VALS, kind="logits"), ValueError,
     "tail='uniform'"),
    ("from_logits k", lambda: SparseTeacher.from_logits(torch.randn(2, 4), 5), ValueError,
     r"k must be an int in \[1, 4\]"),
    ("from_logits k=0", lambda: SparseTeacher.from_logits(torch.randn(2, 4), 0), ValueError,
     "k must be"),
    ("from_logits int", lambda: SparseTeacher.from_logits(IDS, 1), TypeError, "teacher_logits"),
    ("from_logits kind", lambda: SparseTeacher.from_logits(VALS, 1, kind="x"), ValueError,
     "kind"),
]


@pytest.mark.parametrize("name,make,error,match", CONSTRUCTOR_ERRORS,
                         ids=[c[0] for c in CONSTRUCTOR_ERRORS])
def test_bad_sparse_teacher(name, make, error, match):
    with pytest.raises(error, match=match):
        make()


def _call_errors():
    s = torch.randn(2, 5)
    ok = SparseTeacher(IDS, VALS, tail="none")
    return [
        ("leading dims", s, SparseTeacher(IDS[:1], VALS[:1]), ValueError,
         r"teacher_logits.indices and .values must have the student's leading dims \(2,\)"),
        ("tokens vs rows", torch.randn(2, 3, 5), ok, ValueError, "leading dims"),
        ("k > C", torch.randn(2, 1), ok, ValueError, "k = 2 classes per row, more than"),
        ("list member", s, [torch.randn(2, 5), "t"], TypeError, r"teacher_logits\[1\] must be"),
        ("cohort name", s, [torch.randn(2, 5), SparseTeacher(IDS[:1], VALS[:1])], ValueError,
         r"teacher_logits\[1\]\.indices"),
        ("teacher type", s, {"ids": IDS}, TypeError, "fastkd.SparseTeacher"),
    ]


@pytest.mark.parametrize("case", range(len(_call_errors())),
                         ids=[c[0] for c in _call_errors()])
@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
def test_bad_call(backend, case):
    _, s, t, error, match = _call_errors()[case]
    with pytest.raises(error, match=match):
        fastkd.kd_loss(s, t, backend=backend)


@pytest.mark.parametrize("bad", [-1, 5, 1 << 40])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ids_out_of_range_raise_on_the_cpu(backend, bad):
    s = torch.randn(3, 5, requires_grad=True)
    ids = torch.tensor([[0, 1], [2, 3], [4, 0]])
    ids[1, 1] = bad
    for idtype in (torch.int64, torch.int32):
        if idtype == torch.int32 and bad > 2**31:
            continue
        t = SparseTeacher(ids.to(idtype), torch.full((3, 2), -1.0))
        with pytest.raises((ValueError, RuntimeError, IndexError), match=r"indices|[iI]d"):
            fastkd.kd_loss(s, t, backend=backend)
        with pytest.raises((ValueError, RuntimeError, IndexError), match=r"indices|[iI]d"):
            with torch.no_grad():
                fastkd.kd_loss(s, [torch.randn(3, 5), t], alpha=0.5, labels=torch.zeros(3).long(),
                               backend=backend)


def test_reference_refuses_duplicate_ids():
    s = torch.randn(3, 6)
    t = SparseTeacher(torch.tensor([[0, 1], [4, 4], [2, 3]]), torch.full((3, 2), -2.0))
    with pytest.raises(ValueError, match=r"teacher_logits\[1\]\.indices must be distinct in "
                                         r"each row; row 1 holds class 4 twice"):
        fastkd.kd_loss(s, [torch.randn(3, 6), t], backend="torch")


def test_device_mismatch():
    if not torch.cuda.is_available():
        s = torch.randn(2, 5, device="meta")
        with pytest.raises(ValueError, match="teacher_logits.values is on cpu but student_logits "
                                             "is on meta"):
            fastkd.kd_loss(s, SparseTeacher(IDS, VALS))
    ids = torch.zeros(2, 2, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match="indices are on meta but values are on cpu"):
        SparseTeacher(ids, VALS)


# --- torch.library and torch.compile ------------------------------------------------------------


@pytest.mark.skipif("cpu" not in FUSED, reason="the C++ op does not take sparse teachers yet")
def test_opcheck_with_sparse_arguments():
    from torch.library import opcheck

    s = torch.randn(2, 3, 13)
    t = torch.randn(2, 3, 13)
    ids, values, tails = sparse_teacher((6,), 13, 4, top=True)._for_kernel(13, F32)
    y = torch.randint(0, 13, (6,))
    kd_w = torch.rand(2, 6)
    for compute_grad in (False, True):
        opcheck(torch.ops.fastkd.kd_loss_fwd.default,
                (s, [t], y, kd_w, None, [0.5, 0.25], 0.3, 2.0, 0.1, IGNORE, True, compute_grad),
                {"sparse_ids": [ids], "sparse_values": [values], "sparse_tails": [tails]})


COMPILE_CASES = {
    "kd": {"temperature": 2.0},
    "guided_cohort": {"guided": True, "alpha": 0.5, "teacher_weights": [0.3, 1.2],
                      "reduction": "mean"},
    "none": {"alpha": 0.7, "reduction": "none"},
}


@pytest.mark.parametrize("inside", [False, True], ids=["given", "built_inside"])
@pytest.mark.parametrize("case", list(COMPILE_CASES))
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_compile_fullgraph_matches_eager(backend, case, inside):
    kw = COMPILE_CASES[case]
    s, y = student_and_labels((4, 5), 29, ignore=True)
    sparse = sparse_teacher((4, 5), 29, 6, top=True)
    dense = torch.randn(4, 5, 29) * 2
    seeds = torch.linspace(0.5, 2.0, 20).view(4, 5)

    def step(x, ids, values):
        t = SparseTeacher(ids, values) if inside else sparse
        teachers = [t, dense] if "teacher_weights" in kw else t
        loss = fastkd.kd_loss(x, teachers, y, backend=backend, **kw)
        return (loss * seeds).sum() if loss.dim() else 2.5 * loss

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (compiled, step):
        x = s.clone().requires_grad_(True)
        out = fn(x, sparse.indices, sparse.values)
        out.backward()
        results.append((out.detach(), x.grad))
    (c_out, c_grad), (e_out, e_grad) = results
    if backend == "torch":
        # Inductor fuses and reorders the reference's float32 ops: equal to rounding.
        assert_loss_close(c_out, e_out, F32)
        assert_grad_close(c_grad, e_grad, F32)
    else:
        torch.testing.assert_close(c_out, e_out, rtol=2e-6, atol=0)
        torch.testing.assert_close(c_grad, e_grad, rtol=2e-6, atol=1e-9)


# --- GPU ----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestGPU:
    """The GPU backends that take sparse teachers, against the float64 dense reference; an
    out-of-range id makes the loss NaN without a host sync."""

    @pytest.fixture(params=("cuda", "triton", "torch"))
    def backend(self, request):
        if not _takes_sparse(request.param):
            pytest.skip(f"{request.param}: {SPARSE_SUPPORT[request.param]}")
        if request.param == "cuda" and not fastkd._C.with_cuda:
            pytest.skip("fastkd._C was built without its CUDA kernels")
        return request.param

    @pytest.mark.parametrize("classes,k", [(1000, 1), (32000, 64), (131072, 32), (4097, 4097)])
    @pytest.mark.parametrize("dtype", [F32, BF16, F16])
    def test_matches_the_dense_definition(self, backend, classes, k, dtype):
        rows = max(2, min(37, 2_000_000 // (classes * 4)))
        s, y = student_and_labels((rows,), classes, dtype, ignore=True)
        t = sparse_teacher((rows,), classes, k, "log_probs", "uniform", dtype, top=True)
        make_guided_hits(y, t)
        dense = (torch.randn(rows, classes) * 2).to(dtype)
        tc = SparseTeacher(t.indices.cuda(), t.values.cuda(), kind=t.kind, tail=t.tail)
        for kw in ({"temperature": 2.0}, {"alpha": 0.5, "guided": True, "reduction": "none"}):
            x = s.cuda().requires_grad_(True)
            loss = fastkd.kd_loss(x, [tc, dense.cuda()], y.cuda(), backend=backend, **kw)
            (loss * torch.linspace(0.5, 2.0, rows, device="cuda") if loss.dim() else loss).sum() \
                .backward()
            ref_loss, ref_grad = reference_grad(s, [densify(t, classes), dense], y, **kw)
            assert_loss_close(loss.cpu(), ref_loss, dtype, f"{backend} {kw}")
            assert_grad_close(x.grad.cpu(), ref_grad, dtype, f"{backend} {kw}",
                              min_scale=0.1 * _grad_scale_bound(s, [dense, dense], 1.0, **kw))

    def test_out_of_range_id_makes_the_loss_nan(self, backend):
        s = torch.randn(4, 10, device="cuda")
        ids = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 10]], device="cuda")
        t = SparseTeacher(ids, torch.full((4, 2), -1.0, device="cuda"))
        for kw in ({}, {"reduction": "none"}):
            loss = fastkd.kd_loss(s, t, backend=backend, **kw)
            assert torch.isnan(loss).all()
