"""torch.ops.fastkd.kd_loss_fwd with sparse (top-k) teachers, called directly on the CPU.

The oracle is the kernel contract of csrc/kd_loss.h in float64: every sparse teacher is densified
here (``d[ids] = values``, every other class ``tail``), and the row's loss and gradient are the
dense ones, ``T * sum_k w_k KL(softmax(d_k / T) || softmax(s / T)) + v CE``, differentiated by
autograd. Dense teachers come first and sparse ones after them in ``kd_coefs`` and
``kd_row_weights``; every coefficient below is distinct, so a weight applied to the wrong teacher
fails.
"""

from __future__ import annotations

import functools

import pytest
import torch
from kd_helpers import IGNORE, _seed  # noqa: F401  (autouse fixture)
from machine import CPU_CAPABILITIES, check_capability_variant
from tolerances import assert_grad_close, assert_loss_close

import fastkd  # noqa: F401  (loads the op's fake implementation)
from fastkd.ops import OnePassLoss

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
NEG_INF = float("-inf")


# --- inputs and the float64 contract --------------------------------------------------------


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == F64 else F32


def make_sparse(rows: int, classes: int, k: int, dtype: torch.dtype = F32, *,
                tail: float | str = "uniform", scale: float = 2.0):
    """(ids, values, tails) as the op takes them: k distinct int32 ids per row, log-space values
    in `dtype`, and a tail per row: "uniform" (a finite logit below the values, varying per row),
    a number, or -inf."""
    ids = torch.rand(rows, classes).argsort(-1)[:, :k].to(torch.int32).contiguous()
    values = (torch.randn(rows, k, dtype=F64) * scale).to(dtype)
    if tail == "uniform":
        tails = (values.double().min(-1).values - torch.rand(rows, dtype=F64)).to(dtype)
    else:
        tails = torch.full((rows,), float(tail), dtype=dtype)
    return ids, values, tails


def densify(ids: torch.Tensor, values: torch.Tensor, tails: torch.Tensor,
            classes: int) -> torch.Tensor:
    d = tails.double()[:, None].expand(-1, classes).clone()
    d.scatter_(1, ids.long(), values.double())
    return d


def contract(student3, dense, sparse, labels, kd_rw, ce_rw, kd_coefs, ce_coef, temperature,
             label_smoothing):
    """Per-row losses and d(sum of them)/d student, float64, of the op's arguments."""
    classes = student3.shape[-1]
    s = student3.detach().reshape(-1, classes).double().requires_grad_(True)
    rows = s.shape[0]
    teachers = [t.reshape(-1, classes).double() for t in dense]
    teachers += [densify(i, v, tl, classes) for i, v, tl in sparse]
    T = temperature
    log_q = torch.log_softmax(s / T, -1)
    loss = torch.zeros(rows, dtype=F64)
    for k, d in enumerate(teachers):
        rw = kd_rw[k].double() if kd_rw is not None else torch.ones(rows, dtype=F64)
        w = kd_coefs[k] * rw
        log_p = torch.log_softmax(d / T, -1)
        p = log_p.exp()
        kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
        loss = loss + torch.where(w != 0, w * T * kl, 0.0)
    if ce_coef != 0.0:
        v = ce_coef * (ce_rw.double() if ce_rw is not None else torch.ones(rows, dtype=F64))
        y = labels.clamp(0, classes - 1)
        eps = label_smoothing
        target = eps / classes + (1 - eps) * torch.nn.functional.one_hot(y, classes).double()
        ce = -(target * torch.log_softmax(s, -1)).sum(-1)
        loss = loss + torch.where(v != 0, v * ce, 0.0)
    loss.sum().backward()
    return loss.detach(), s.grad


def run_op(student3, dense, sparse, labels=None, kd_rw=None, ce_rw=None, kd_coefs=None,
           ce_coef=0.0, temperature=1.0, label_smoothing=0.0, per_row=True, compute_grad=True):
    kd_coefs = kd_coefs if kd_coefs is not None else [1.0] * (len(dense) + len(sparse))
    return torch.ops.fastkd.kd_loss_fwd(
        student3, dense, labels, kd_rw, ce_rw, kd_coefs, ce_coef, temperature, label_smoothing,
        IGNORE, per_row, compute_grad, [x[0] for x in sparse], [x[1] for x in sparse],
        [x[2] for x in sparse],
    )


def check(student3, dense, sparse, labels=None, kd_rw=None, ce_rw=None, kd_coefs=None,
          ce_coef=0.0, temperature=1.0, label_smoothing=0.0, msg=""):
    """The op (per-row and summed, with and without the gradient) against the contract."""
    kw = dict(labels=labels, kd_rw=kd_rw, ce_rw=ce_rw, kd_coefs=kd_coefs, ce_coef=ce_coef,
              temperature=temperature, label_smoothing=label_smoothing)
    coefs = kd_coefs if kd_coefs is not None else [1.0] * (len(dense) + len(sparse))
    want_loss, want_grad = contract(student3, dense, sparse, labels, kd_rw, ce_rw, coefs, ce_coef,
                                    temperature, label_smoothing)
    dtype = student3.dtype
    loss, grad = run_op(student3, dense, sparse, **kw)
    assert loss.dtype == acc_dtype(dtype) and loss.shape == want_loss.shape
    assert_loss_close(loss, want_loss, dtype, msg)
    assert grad.shape == student3.shape and grad.is_contiguous()
    assert_grad_close(grad.reshape(want_grad.shape), want_grad, dtype, msg)
    total, grad2 = run_op(student3, dense, sparse, per_row=False, **kw)
    assert total.dim() == 0
    assert_loss_close(total, want_loss.sum(), dtype, msg)
    assert torch.equal(grad2, grad)
    no_grad_loss, empty = run_op(student3, dense, sparse, compute_grad=False, **kw)
    assert empty.numel() == 0
    assert torch.equal(no_grad_loss, loss)
    return loss, grad


def rows3d(rows: int, classes: int, dtype: torch.dtype, scale: float = 2.0) -> torch.Tensor:
    return (torch.randn(rows, 1, classes, dtype=F64) * scale).to(dtype)


def row_weights(teachers: int, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """Distinct positive weights per teacher and row, a few rows 0 for every teacher."""
    w = torch.rand(teachers, rows, dtype=F64) + 0.5 * torch.arange(1, teachers + 1)[:, None]
    w[:, 1::5] = 0.0
    return w.to(acc_dtype(dtype))


# --- one sparse teacher: k, tails, temperatures, dtypes ---------------------------------------

ROWS, CLASSES = 41, 1271
K_CASES = {"k1": 1, "k5": 5, "k64": 64, "k_C-1": CLASSES - 1, "k_C": CLASSES}
DTYPES = {"fp32": F32, "bf16": BF16, "fp16": F16, "fp64": F64}


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("tail", ["uniform", "-inf"])
@pytest.mark.parametrize("k", list(K_CASES))
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_one_sparse_teacher(dtype, k, tail, temperature):
    dtype = DTYPES[dtype]
    s = rows3d(ROWS, CLASSES, dtype)
    sp = make_sparse(ROWS, CLASSES, K_CASES[k], acc_dtype(dtype),
                     tail=tail if tail == "uniform" else NEG_INF)
    kd_rw = row_weights(1, ROWS, dtype)
    loss, grad = check(s, [], [sp], kd_rw=kd_rw, kd_coefs=[0.7], temperature=temperature)
    # Rows of weight 0 cost nothing: loss and gradient exactly 0.
    assert torch.all(loss[1::5] == 0) and torch.all(grad[1::5] == 0)


def test_values_of_minus_infinity_contribute_nothing():
    """p = 0 entries (-inf values, -inf tail) add exactly 0, even where the student is -inf too
    (masked vocabulary): -inf - (-inf) must not leak a NaN."""
    rows, classes, k = 9, 50, 8
    s = rows3d(rows, classes, F32)
    ids, values, tails = make_sparse(rows, classes, k, tail=NEG_INF)
    values[:, ::2] = NEG_INF
    # The student masks the classes where the teacher has no mass.
    s.view(rows, classes).scatter_(1, ids[:, ::2].long(), NEG_INF)
    s[0, 0, :] = torch.where(densify(ids, values, tails, classes)[0] == NEG_INF, NEG_INF, s[0, 0])
    loss, grad = check(s, [], [(ids, values, tails)], temperature=2.0)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_masked_student_with_a_finite_tail():
    """With a finite tail every class outside the ids has mass. Masked (-inf) student logits at
    ids of value -inf leave the loss finite (the row sum of s is -inf there, and the kernel takes
    the tail's sum without them); a masked class in the tail makes KL infinite."""
    rows, classes, k = 4, 40, 6
    s = rows3d(rows, classes, F32)
    ids, values, tails = make_sparse(rows, classes, k)
    values[:, 0] = NEG_INF
    s.view(rows, classes).scatter_(1, ids[:, :1].long(), NEG_INF)
    loss, grad = check(s, [], [(ids, values, tails)], temperature=1.0)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    outside = [c for c in range(classes) if c not in ids[2].tolist()][0]
    s[2, 0, outside] = NEG_INF
    loss, _ = run_op(s, [], [(ids, values, tails)])
    assert loss[2] == float("inf") and torch.isfinite(loss[[0, 1, 3]]).all()


def test_nan_values_give_nan():
    rows, classes = 5, 30
    s = rows3d(rows, classes, F32)
    ids, values, tails = make_sparse(rows, classes, 4)
    values[2, 1] = float("nan")
    tails[3] = float("nan")
    loss, grad = run_op(s, [], [(ids, values, tails)])
    assert torch.isnan(loss[2]) and torch.isnan(loss[3])
    assert torch.isfinite(loss[[0, 1, 4]]).all()
    assert torch.isnan(grad[2]).any() and torch.isnan(grad[3]).any()
    assert torch.isfinite(grad[[0, 1, 4]]).all()
    total, _ = run_op(s, [], [(ids, values, tails)], per_row=False)
    assert torch.isnan(total)


def test_a_row_of_zero_weights_is_not_read():
    """Weight 0 everywhere on a row: loss 0 and gradient 0 even if its inputs are NaN or -inf."""
    rows, classes = 4, 20
    s = rows3d(rows, classes, BF16)
    s[1] = NEG_INF
    ids, values, tails = make_sparse(rows, classes, 3)
    values[1] = float("nan")
    kd_rw = torch.ones(2, rows)
    kd_rw[:, 1] = 0
    dense = [rows3d(rows, classes, F16)]
    loss, grad = run_op(s, dense, [(ids, values, tails)], kd_rw=kd_rw)
    assert loss[1] == 0 and torch.all(grad[1] == 0)
    assert torch.isfinite(loss).all()


# --- mixed dense and sparse, CE, row weights ----------------------------------------------------


@pytest.mark.parametrize("per_teacher_rows", [True, False], ids=["own_rows", "shared_rows"])
@pytest.mark.parametrize("dtype,teacher_dtype", [(F32, F32), (BF16, F16), (F16, BF16), (F64, F64)],
                         ids=["fp32", "bf16_fp16", "fp16_bf16", "fp64"])
def test_dense_then_sparse_teachers_with_ce(dtype, teacher_dtype, per_teacher_rows):
    """Two dense and two sparse teachers (one with a finite tail, one without), CE with label
    smoothing at T = 4, row weights with zeros and ignored labels: coefficients and row weights
    must reach their own teacher, dense first."""
    rows, classes = 23, 301
    s = rows3d(rows, classes, dtype)
    dense = [rows3d(rows, classes, teacher_dtype) for _ in range(2)]
    acc = acc_dtype(dtype)
    sparse = [make_sparse(rows, classes, 17, acc),
              make_sparse(rows, classes, 40, acc, tail=NEG_INF)]
    labels = torch.randint(0, classes, (rows,))
    labels[2::7] = IGNORE
    ce_rw = (labels != IGNORE).to(acc) * 0.8
    if per_teacher_rows:
        kd_rw = row_weights(4, rows, dtype)
    else:
        kd_rw = ce_rw.expand(4, rows)
    check(s, dense, sparse, labels=labels, kd_rw=kd_rw, ce_rw=ce_rw,
          kd_coefs=[0.3, 0.45, 1.2, 0.9], ce_coef=0.4, temperature=4.0, label_smoothing=0.1)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_ce_with_smoothing_and_sparse_teachers_only(temperature):
    rows, classes = 19, 257
    s = rows3d(rows, classes, F32)
    sparse = [make_sparse(rows, classes, 5), make_sparse(rows, classes, 64),
              make_sparse(rows, classes, 1, tail=NEG_INF)]
    labels = torch.randint(0, classes, (rows,))
    check(s, [], sparse, labels=labels, kd_coefs=[0.5, 0.25, 2.0], ce_coef=0.6,
          temperature=temperature, label_smoothing=0.2)


def test_the_order_of_teachers_matters():
    """Swapping a dense and a sparse teacher's coefficients changes the loss: the test above would
    notice a kernel that read them in the wrong order."""
    rows, classes = 6, 64
    s = rows3d(rows, classes, F32)
    dense = [rows3d(rows, classes, F32)]
    sparse = [make_sparse(rows, classes, 4)]
    a, _ = run_op(s, dense, sparse, kd_coefs=[1.0, 3.0])
    b, _ = run_op(s, dense, sparse, kd_coefs=[3.0, 1.0])
    assert not torch.allclose(a, b, rtol=1e-3)


def test_logits_with_a_large_offset():
    """Student logits of 1e4 against log-probabilities: the KL is taken relative to both maxima,
    so float32 keeps its precision."""
    rows, classes = 8, 500
    s = (torch.randn(rows, 1, classes) * 3 + 1e4).float()
    ids, values, tails = make_sparse(rows, classes, 32)
    d = torch.log_softmax(densify(ids, values, tails, classes), -1)
    values = d.gather(1, ids.long()).float()
    tails = d[torch.arange(rows), _first_outside(ids, classes)].float()
    check(s, [], [(ids, values, tails)], temperature=2.0)


def _first_outside(ids: torch.Tensor, classes: int) -> torch.Tensor:
    mask = torch.ones(ids.shape[0], classes, dtype=torch.bool)
    mask.scatter_(1, ids.long(), False)
    return mask.to(torch.int8).argmax(-1)


# --- shapes and strides -----------------------------------------------------------------------


def test_one_row():
    s = rows3d(1, 7, F32)
    check(s, [], [make_sparse(1, 7, 3)], temperature=2.0)
    check(s, [rows3d(1, 7, F32)], [make_sparse(1, 7, 7, tail=NEG_INF)], kd_coefs=[0.5, 2.0])


def test_one_class():
    s = rows3d(3, 1, F32)
    loss, grad = check(s, [], [make_sparse(3, 1, 1)])
    assert torch.all(loss.abs() < 1e-6)


@pytest.mark.parametrize("k", [64, 32768])
def test_large_vocabulary(k):
    rows, classes = 3, 32768
    s = rows3d(rows, classes, BF16)
    check(s, [], [make_sparse(rows, classes, k)], temperature=4.0)


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_strided_rows(layout):
    """[B, L, C] students with outer and inner strides (row b at (b / L) * stride(0) + (b % L) *
    stride(1)); the sparse tensors are [B * L, k] in the same row order."""
    B, L, C = 3, 5, 97
    if layout == "sliced":
        s = torch.randn(B, L + 2, C + 6)[:, 1 : L + 1, :C]
    else:
        s = torch.randn(L, B, C).transpose(0, 1)
    assert not s.is_contiguous()
    dense = [torch.randn(L, B, C).transpose(0, 1)]
    sparse = [make_sparse(B * L, C, 9), make_sparse(B * L, C, 30, tail=NEG_INF)]
    labels = torch.randint(0, C, (B * L,))
    check(s, dense, sparse, labels=labels, kd_coefs=[0.2, 0.7, 1.1], ce_coef=0.3,
          temperature=2.0, label_smoothing=0.05)


# --- float64 gradcheck ------------------------------------------------------------------------


def _differentiable(sparse, dense=(), **kw):
    """The op as autograd sees it through fastkd.kd_loss: OnePassLoss over the op with the sparse
    lists bound by name (they follow compute_grad in the schema)."""
    fwd = functools.partial(torch.ops.fastkd.kd_loss_fwd, sparse_ids=[x[0] for x in sparse],
                            sparse_values=[x[1] for x in sparse],
                            sparse_tails=[x[2] for x in sparse])
    args = (list(dense), kw.get("labels"), kw.get("kd_rw"), kw.get("ce_rw"), kw["kd_coefs"],
            kw.get("ce_coef", 0.0), kw.get("temperature", 1.0), kw.get("label_smoothing", 0.0),
            IGNORE, False)
    return lambda s3: OnePassLoss.apply(s3, fwd, torch.ops.fastkd.scale_grad_, *args)


GRADCHECK_CASES = {
    "sparse_k3": dict(k=3, tail="uniform", dense=False, ce=False),
    "sparse_all_classes": dict(k=7, tail="uniform", dense=False, ce=False),
    "no_tail": dict(k=2, tail=NEG_INF, dense=False, ce=False),
    "mixed_ce": dict(k=4, tail="uniform", dense=True, ce=True),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck(case):
    c = GRADCHECK_CASES[case]
    rows, classes = 6, 7
    # [2, 3, 7] logits read through a slice of a wider tensor.
    big = torch.randn(2, 3, classes + 4, dtype=F64, requires_grad=True)
    sparse = [make_sparse(rows, classes, c["k"], F64, tail=c["tail"])]
    dense = [torch.randn(2, 3, classes, dtype=F64)] if c["dense"] else []
    kw = dict(kd_coefs=[0.6] * (len(dense) + 1) if not c["dense"] else [0.6, 1.3],
              temperature=2.5, kd_rw=row_weights(len(dense) + 1, rows, F64))
    if c["ce"]:
        kw.update(labels=torch.randint(0, classes, (rows,)), ce_coef=0.4, label_smoothing=0.1)
    f = _differentiable(sparse, dense, **kw)
    assert torch.autograd.gradcheck(lambda x: f(x[..., :classes]), (big,))


# --- checks -----------------------------------------------------------------------------------

B, C = 4, 10


def _args(**override):
    ids, values, tails = make_sparse(B, C, 3)
    args = dict(
        student=torch.randn(B, 1, C), teachers=[], labels=None, kd_row_weights=None,
        ce_row_weights=None, kd_coefs=[1.0], ce_coef=0.0, temperature=1.0, label_smoothing=0.0,
        ignore_index=IGNORE, per_row=False, compute_grad=True, sparse_ids=[ids],
        sparse_values=[values], sparse_tails=[tails],
    )
    args.update(override)
    return list(args.values())


def _ids(*rows):
    return torch.tensor(rows, dtype=torch.int32)


BAD_ARGS = [
    ("lengths", {"sparse_tails": []},
     r"sparse_ids, sparse_values and sparse_tails must hold one tensor per sparse teacher each, "
     r"got 1, 1 and 0"),
    ("no_teacher", {"sparse_ids": [], "sparse_values": [], "sparse_tails": [], "kd_coefs": []},
     r"takes 1 to 8 teachers, got 0 \(0 dense, 0 sparse\)"),
    ("nine_teachers", {"teachers": [torch.randn(B, 1, C)] * 8, "kd_coefs": [1.0] * 9},
     r"takes 1 to 8 teachers, got 9 \(8 dense, 1 sparse\)"),
    ("kd_coefs_count", {"teachers": [torch.randn(B, 1, C)]},
     r"kd_coefs must hold one value per teacher \(2: 1 dense, then 1 sparse\), got 1"),
    ("ids_int64", {"sparse_ids": [torch.zeros(B, 3, dtype=torch.long)]},
     r"sparse_ids\[0\] must be int32, got Long"),
    ("ids_rows", {"sparse_ids": [torch.zeros(B + 1, 3, dtype=torch.int32)]},
     r"sparse_ids\[0\] must be a contiguous \[4, k\] tensor with 1 <= k <= 10"),
    ("ids_1d", {"sparse_ids": [torch.zeros(B, dtype=torch.int32)]},
     r"sparse_ids\[0\] must be a contiguous \[4, k\] tensor"),
    ("ids_k0", {"sparse_ids": [torch.zeros(B, 0, dtype=torch.int32)],
                "sparse_values": [torch.zeros(B, 0)]},
     r"sparse_ids\[0\] must be a contiguous \[4, k\] tensor with 1 <= k <= 10"),
    ("ids_k_above_C", {"sparse_ids": [torch.zeros(B, C + 1, dtype=torch.int32)],
                       "sparse_values": [torch.zeros(B, C + 1)]},
     r"sparse_ids\[0\] must be a contiguous \[4, k\] tensor with 1 <= k <= 10"),
    ("ids_strided", {"sparse_ids": [torch.zeros(B, 6, dtype=torch.int32)[:, ::2]]},
     r"sparse_ids\[0\] must be a contiguous"),
    ("values_f64", {"sparse_values": [torch.zeros(B, 3, dtype=F64)]},
     r"sparse_values\[0\] must be Float \(the accumulation dtype of a Float student\), got Double"),
    ("values_bf16", {"sparse_values": [torch.zeros(B, 3, dtype=BF16)]},
     r"sparse_values\[0\] must be Float"),
    ("values_shape", {"sparse_values": [torch.zeros(B, 4)]},
     r"sparse_values\[0\] must be contiguous with the shape of sparse_ids\[0\]"),
    ("values_strided", {"sparse_values": [torch.zeros(3, B).t()]},
     r"sparse_values\[0\] must be contiguous"),
    ("tails_dtype", {"sparse_tails": [torch.zeros(B, dtype=F16)]},
     r"sparse_tails\[0\] must be Float"),
    ("tails_shape", {"sparse_tails": [torch.zeros(B, 1)]},
     r"sparse_tails\[0\] must be a contiguous vector of 4 values"),
    ("tails_strided", {"sparse_tails": [torch.zeros(2 * B)[::2]]},
     r"sparse_tails\[0\] must be a contiguous vector"),
    ("row_weights_count", {"teachers": [torch.randn(B, 1, C)], "kd_coefs": [1.0, 1.0],
                           "kd_row_weights": torch.ones(1, B)},
     r"kd_row_weights must be \[2, 4\]"),
    ("id_too_large", {"sparse_ids": [_ids([0, 1, 2], [3, 4, 5], [6, 7, C], [0, 1, 2])]},
     r"sparse_ids must be in \[0, 10\); sparse teacher 0 has id 10 on row 2"),
    ("id_negative", {"sparse_ids": [_ids([0, 1, 2], [-1, 4, 5], [6, 7, 8], [0, 1, 2])]},
     r"sparse_ids must be in \[0, 10\); sparse teacher 0 has id -1 on row 1"),
]


@pytest.mark.parametrize("override,match", [c[1:] for c in BAD_ARGS], ids=[c[0] for c in BAD_ARGS])
def test_bad_arguments_raise(override, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastkd.kd_loss_fwd(*_args(**override))


def test_float64_values_with_a_float64_student():
    s = torch.randn(B, 1, C, dtype=F64)
    with pytest.raises(RuntimeError, match=r"sparse_values\[0\] must be Double"):
        torch.ops.fastkd.kd_loss_fwd(*_args(student=s))


def test_out_of_range_ids_raise_on_rows_of_weight_zero_and_in_any_teacher():
    """Ids are checked on every row (like labels), whatever the row's weight, in every teacher."""
    good = make_sparse(B, C, 3)
    bad_ids = good[0].clone()
    bad_ids[3, 2] = C + 7
    kd_rw = torch.ones(3, B)
    kd_rw[:, 3] = 0
    with pytest.raises(RuntimeError, match=r"sparse teacher 1 has id 17 on row 3"):
        torch.ops.fastkd.kd_loss_fwd(*_args(
            teachers=[torch.randn(B, 1, C)], kd_coefs=[1.0, 1.0, 1.0], kd_row_weights=kd_rw,
            sparse_ids=[good[0], bad_ids], sparse_values=[good[1], good[1]],
            sparse_tails=[good[2], good[2]], compute_grad=False,
        ))


@pytest.mark.skipif(not torch.cuda.is_available() or not fastkd._C.with_cuda,
                    reason="needs a CUDA GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_cuda_op_matches_the_contract(dtype):
    """The same op on a GPU (the CUDA kernels): dense then sparse teachers, CE with smoothing."""
    rows, classes = 23, 301
    s = rows3d(rows, classes, dtype)
    dense = [rows3d(rows, classes, dtype)]
    sparse = [make_sparse(rows, classes, 17), make_sparse(rows, classes, 40, tail=NEG_INF)]
    labels = torch.randint(0, classes, (rows,))
    kd_rw = row_weights(3, rows, dtype)
    coefs = [0.3, 1.2, 0.9]
    want_loss, want_grad = contract(s, dense, sparse, labels, kd_rw, None, coefs, 0.4, 4.0, 0.1)
    loss, grad = run_op(s.cuda(), [t.cuda() for t in dense],
                        [tuple(x.cuda() for x in sp) for sp in sparse], labels=labels.cuda(),
                        kd_rw=kd_rw.cuda(), kd_coefs=coefs, ce_coef=0.4, temperature=4.0,
                        label_smoothing=0.1)
    assert_loss_close(loss.cpu(), want_loss, dtype)
    assert_grad_close(grad.cpu().reshape(want_grad.shape), want_grad, dtype)


# --- torch.library.opcheck --------------------------------------------------------------------


def _opcheck_sets() -> dict[str, tuple[tuple, dict]]:
    s = torch.randn(2, 3, 13)
    t = torch.randn(2, 3, 13).bfloat16()
    s64 = torch.randn(2, 3, 13, dtype=F64)
    y = torch.randint(0, 13, (6,))
    y[4] = IGNORE
    ce_w = torch.rand(6)
    ce_w[4] = 0.0
    sp = [make_sparse(6, 13, 4), make_sparse(6, 13, 13, tail=NEG_INF)]
    sp64 = [make_sparse(6, 13, 5, F64)]

    def kw(sparse):
        return {"sparse_ids": [x[0] for x in sparse], "sparse_values": [x[1] for x in sparse],
                "sparse_tails": [x[2] for x in sparse]}

    return {
        "sparse_only": ((s, [], None, None, None, [0.5, 2.0], 0.0, 2.0, 0.0, IGNORE, False,
                         True), kw(sp)),
        "mixed_per_row": ((s, [t], y, torch.rand(3, 6), ce_w, [0.5, 0.25, 1.5], 0.3, 2.0, 0.1,
                           IGNORE, True, True), kw(sp)),
        "float64_no_grad": ((s64, [], y, None, ce_w.double(), [1.0], 0.5, 1.0, 0.0, IGNORE,
                             False, False), kw(sp64)),
    }


@pytest.mark.parametrize("name", ["sparse_only", "mixed_per_row", "float64_no_grad"])
def test_opcheck(name):
    args, kwargs = _opcheck_sets()[name]
    torch.library.opcheck(torch.ops.fastkd.kd_loss_fwd.default, args, kwargs)


# --- determinism, CPU capabilities ------------------------------------------------------------


def test_bitwise_identical_whatever_the_thread_count():
    rows, classes = 300, 1000
    s = rows3d(rows, classes, BF16)
    dense = [rows3d(rows, classes, BF16)]
    sparse = [make_sparse(rows, classes, 64), make_sparse(rows, classes, 7, tail=NEG_INF)]
    labels = torch.randint(0, classes, (rows,))
    kw = dict(labels=labels, kd_rw=row_weights(3, rows, BF16), kd_coefs=[0.5, 1.0, 0.3],
              ce_coef=0.2, temperature=2.0, label_smoothing=0.1)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        for per_row in (True, False):
            results.append((threads, per_row, *run_op(s, dense, sparse, per_row=per_row, **kw)))
    for threads, per_row, loss, grad in results:
        ref = next(r for r in results if r[0] == 1 and r[1] == per_row)
        assert torch.equal(loss, ref[2]), (threads, per_row)
        assert torch.equal(grad, ref[3]), (threads, per_row)


CAPABILITY_SCRIPT = """
    import torch
    import test_kd_loss_sparse_op as t

    print(torch.backends.cpu.get_cpu_capability())
    torch.manual_seed(0)
    torch.set_num_threads(1)
    for dtype, tdtype in [(torch.float32, torch.float32), (torch.bfloat16, torch.float16),
                          (torch.float16, torch.bfloat16), (torch.float64, torch.float64)]:
        acc = t.acc_dtype(dtype)
        # 37 classes: full vectors of every width (8, 16 floats) and a remainder; k of 1, 19
        # (a remainder) and 37.
        rows, classes = 6, 37
        s = t.rows3d(rows, classes, dtype)
        dense = [t.rows3d(rows, classes, tdtype)]
        for k, tail in [(1, "uniform"), (19, "uniform"), (19, float("-inf")), (37, "uniform")]:
            sparse = [t.make_sparse(rows, classes, k, acc, tail=tail)]
            t.check(s, [], sparse, temperature=2.0, msg=f"{dtype} k={k}")
            labels = torch.randint(0, classes, (rows,))
            t.check(s, dense, sparse, labels=labels, kd_rw=t.row_weights(2, rows, dtype),
                    kd_coefs=[0.4, 1.3], ce_coef=0.5, temperature=3.0, label_smoothing=0.1,
                    msg=f"{dtype} k={k} mixed")
    print("ok")
"""


@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_cpu_capability_variants(capability):
    check_capability_variant(CAPABILITY_SCRIPT, capability)
