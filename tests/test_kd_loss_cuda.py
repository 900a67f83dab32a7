"""The GPU backends of ``fastkd.kd_loss``: CUDA C++ (csrc/cuda/kd_loss.cu, csrc/cuda/scale_grad.cu)
and Triton (kernels/kd_loss.py), each run by every loss test through the ``backend`` fixture.

Checked against the float64 reference (``fastkd.reference.kd_loss_ref``) and, op for op, the CUDA
kernel against the CPU kernel, over dtypes, class counts that hit every kernel path (a warp per
row, a block per row in registers, streaming rows; 16-byte vectors and the one-element fallback),
strides, teacher cohorts and options. Also: no host synchronisation, CUDA-graph capture and
replay, bitwise determinism, and the device-side skip of ``scale_grad_`` when ``grad_output`` is 1.
"""

from __future__ import annotations

import pytest
import torch

import fastkd
from fastkd.reference import kd_loss_ref

CUDA = torch.cuda.is_available()
WITH_CUDA_KERNELS = bool(fastkd._C.with_cuda)
NO_CUDA_KERNELS = "fastkd._C was built without its CUDA kernels"

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
# For the tests of the CUDA C++ ops themselves.
needs_cuda_kernels = pytest.mark.skipif(CUDA and not WITH_CUDA_KERNELS, reason=NO_CUDA_KERNELS)


@pytest.fixture(params=("cuda", "triton"))
def backend(request):
    """Each GPU backend of fastkd.kd_loss in turn."""
    if request.param == "cuda" and not WITH_CUDA_KERNELS:
        pytest.skip(NO_CUDA_KERNELS)
    return request.param


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Class counts: 1 and 7 (one element per access), 100 and 1000 (a warp / two warps per row),
# 4097 (odd, a block per row), 8192 (the widest resident row), 8200 and up (streaming rows),
# 40003 (streaming, one element per access).
CLASSES = (1, 7, 100, 1000, 4097, 8192, 8200, 32000, 40003, 131072, 262144)
# (rtol, atol as a fraction of the largest reference gradient entry) of the gradient, whose
# entries are rounded to the student's dtype; losses are float32 sums.
GRAD_TOL = {
    torch.float32: (2e-4, 1e-5),
    torch.bfloat16: (1.6e-2, 8e-3),
    torch.float16: (2e-3, 1e-3),
}
LOSS_TOL = dict(rtol=2e-4, atol=1e-4)


def _rows_for(classes: int) -> int:
    return max(2, min(37, 2_000_000 // (classes * 4)))


def _logits(rows: int, classes: int, dtype: torch.dtype, seed: int, k: int = 1):
    """A student and k teachers that resemble it (so KL is O(0.1-1), not O(log C))."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    s = 2.0 * torch.randn(rows, classes, device="cuda", generator=g)
    ts = [s * 0.7 + torch.randn(rows, classes, device="cuda", generator=g) for _ in range(k)]
    return s.to(dtype), [t.to(dtype) for t in ts]


def _labels(rows: int, classes: int, seed: int, ignore_every: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    y = torch.randint(0, classes, (rows,), device="cuda", generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return y


def _loss_and_grad(backend, student, teachers, labels, grad_output=None, **kw):
    s = student.detach().clone().requires_grad_(True)
    loss = fastkd.kd_loss(s, teachers, labels, backend=backend, **kw)
    loss.backward(grad_output if grad_output is not None else torch.ones_like(loss))
    return loss.detach(), s.grad


def _ref_loss_and_grad(student, teachers, labels, grad_output=None, **kw):
    s = student.detach().double().requires_grad_(True)
    loss = kd_loss_ref(s, [t.double() for t in teachers], labels, **kw)
    go = grad_output.double() if grad_output is not None else torch.ones_like(loss)
    loss.backward(go)
    return loss.detach(), s.grad


def _assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == dtype
    rtol, atol_frac = GRAD_TOL[dtype]
    scale = expected.abs().max().item()
    torch.testing.assert_close(
        actual.double(), expected, rtol=rtol, atol=max(atol_frac * scale, 1e-30)
    )


def _check(backend, student, teachers, labels=None, grad_output=None, **kw):
    loss, grad = _loss_and_grad(backend, student, teachers, labels, grad_output, **kw)
    ref_loss, ref_grad = _ref_loss_and_grad(student, teachers, labels, grad_output, **kw)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), ref_loss, **LOSS_TOL)
    _assert_grad_close(grad, ref_grad, student.dtype)


# ---- Parity with the float64 reference ----------------------------------------------------------


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kd_matches_reference(backend, dtype, classes):
    rows = _rows_for(classes)
    s, ts = _logits(rows, classes, dtype, seed=classes)
    _check(backend, s, ts, temperature=2.0)


@pytest.mark.parametrize("classes", (7, 1000, 4097, 32000))
@pytest.mark.parametrize(
    "student_dtype,teacher_dtype",
    [
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float16),
        (torch.float16, torch.float32),
    ],
    ids=str,
)
def test_mixed_dtypes(backend, student_dtype, teacher_dtype, classes):
    rows = _rows_for(classes)
    s, ts = _logits(rows, classes, torch.float32, seed=3)
    _check(backend, s.to(student_dtype), [t.to(teacher_dtype) for t in ts], temperature=3.0)


@pytest.mark.parametrize("classes", (100, 1000, 4097, 32000, 131072))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "options",
    [
        dict(alpha=0.3, temperature=1.0),
        dict(alpha=0.3, temperature=4.0),
        dict(alpha=0.5, temperature=1.0, label_smoothing=0.1),
        dict(alpha=0.7, temperature=2.0, label_smoothing=0.2),
        dict(alpha=0.0, temperature=2.0),
        dict(temperature=2.0, guided=True),
        dict(alpha=0.5, temperature=1.0, guided=True, label_smoothing=0.1),
        dict(alpha=0.5, temperature=3.0, reduction="sum"),
        dict(alpha=0.5, temperature=3.0, reduction="mean"),
        dict(alpha=0.5, temperature=3.0, reduction="none"),
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_options_match_reference(backend, dtype, classes, options):
    rows = _rows_for(classes)
    s, ts = _logits(rows, classes, dtype, seed=7)
    # Guided KD needs rows the teacher gets right: label half the rows with its argmax.
    y = _labels(rows, classes, seed=7, ignore_every=5)
    y[1::2] = ts[0][1::2].float().argmax(-1)
    go = None
    if options.get("reduction") == "none":
        go = torch.rand(rows, device="cuda") + 0.5
    _check(backend, s, ts, y, grad_output=go, **options)


@pytest.mark.parametrize("classes", (7, 100, 1000, 4097, 32000))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", (2, 3, 8))
def test_teacher_cohorts(backend, dtype, classes, k):
    rows = _rows_for(classes)
    s, ts = _logits(rows, classes, dtype, seed=11, k=k)
    y = _labels(rows, classes, seed=11, ignore_every=3)
    weights = [0.5 + i for i in range(k)]
    weights[1] = 0.0  # a weight of exactly 0 skips that teacher
    _check(backend, s, ts, y, alpha=0.6, temperature=2.0, teacher_weights=weights)
    # Guided: give every other row a teacher's argmax as label, so each teacher is right on some
    # rows (random labels almost never are at large C, which would leave only zeros to compare).
    hits = y.clone()
    for i, t in enumerate(ts):
        hits[i :: 2 * k] = t.float().argmax(-1)[i :: 2 * k]
    _check(backend, s, ts, hits, temperature=1.0, guided=True, teacher_weights=weights)


# ---- Divergences: reverse KL and JSD(beta) ------------------------------------------------------

DIVERGENCES = (("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2))


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=("reverse", "jsd0.5", "jsd0.2"))
def test_divergences_match_reference(backend, divergence, beta, dtype, classes):
    """Every kernel path (a warp, a block in registers, streaming rows) for each divergence, with a
    2-teacher cohort, CE + smoothing and ignored rows; then one teacher, KD alone."""
    rows = _rows_for(classes)
    s, ts = _logits(rows, classes, dtype, seed=classes + 1, k=2)
    y = _labels(rows, classes, seed=classes, ignore_every=3)
    _check(backend, s, ts, y, alpha=0.7, temperature=2.0, label_smoothing=0.1,
           teacher_weights=[1.0, 0.4], divergence=divergence, beta=beta)
    _check(backend, s, ts[:1], temperature=1.0, divergence=divergence, beta=beta)


@pytest.mark.parametrize("classes", (7, 1000, 8192, 32000, 131072))
@pytest.mark.parametrize("divergence,beta", DIVERGENCES[:2], ids=("reverse", "jsd"))
def test_divergences_with_sparse_teachers(backend, divergence, beta, classes):
    """A sparse teacher (uniform tail; for JSD also tail "none") beside a dense one, per-row
    losses, against the float64 reference on the densified teacher."""
    rows = _rows_for(classes)
    s, ts = _logits(rows, classes, torch.bfloat16, seed=31)
    k = min(16, classes)
    top = fastkd.SparseTeacher.from_logits(ts[0].float(), k)
    teachers = [ts[0], top]
    if divergence == "jsd":
        g = torch.Generator(device="cuda").manual_seed(32)
        logits = torch.randn(rows, classes, device="cuda", generator=g) * 2
        top_ids = logits.topk(k, -1).indices
        teachers.append(fastkd.SparseTeacher(top_ids, logits.gather(-1, top_ids), kind="logits",
                                             tail="none"))
    go = torch.rand(rows, device="cuda") + 0.5
    kw = dict(temperature=2.0, reduction="none", divergence=divergence, beta=beta)
    loss, grad = _loss_and_grad(backend, s, teachers, None, go, **kw)
    x = s.detach().double().requires_grad_(True)
    ref = kd_loss_ref(x, [t.double() if isinstance(t, torch.Tensor) else t for t in teachers],
                      **kw)
    ref.backward(go.double())
    torch.testing.assert_close(loss.double(), ref.detach(), **LOSS_TOL)
    _assert_grad_close(grad, x.grad, torch.bfloat16)


@pytest.mark.parametrize("divergence", ("reverse_kl", "jsd"))
def test_divergences_without_host_sync(backend, divergence):
    s, ts = _logits(8, 32000, torch.bfloat16, seed=33, k=2)
    y = _labels(8, 32000, seed=33, ignore_every=3)
    kw = dict(alpha=0.5, divergence=divergence)
    _loss_and_grad(backend, s, ts, y, **kw)
    torch.cuda.synchronize()
    x = s.detach().clone().requires_grad_(True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fastkd.kd_loss(x, ts, y, backend=backend, **kw).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None


@needs_cuda_kernels
@pytest.mark.parametrize("classes", (100, 8192, 40003))
@pytest.mark.parametrize("divergence", (1, 2))
def test_divergence_op_matches_cpu_kernel(divergence, classes):
    """The CUDA op against the C++ CPU op on the same arguments (float32)."""
    s, ts = _logits(6, classes, torch.float32, seed=34, k=2)
    y = _labels(6, classes, seed=34, ignore_every=4)

    def args(dev):
        return (s.to(dev).view(2, 3, classes), [t.to(dev).view(2, 3, classes) for t in ts],
                y.to(dev), None, None, [0.3, 0.2], 0.4, 1.5, 0.1, -100, True, True, [], [], [])

    cuda_loss, cuda_grad = torch.ops.fastkd.kd_loss_fwd(*args("cuda"), divergence=divergence,
                                                        beta=0.3)
    cpu_loss, cpu_grad = torch.ops.fastkd.kd_loss_fwd(*args("cpu"), divergence=divergence,
                                                      beta=0.3)
    torch.testing.assert_close(cuda_loss.cpu(), cpu_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cuda_grad.cpu(), cpu_grad, rtol=1e-4, atol=1e-7)


# ---- Memory layouts: vectorised and one-element paths ----------------------------------------


@pytest.mark.parametrize("classes", (100, 1000, 4097, 32000, 40003))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unaligned_rows(backend, dtype, classes):
    """Rows that start off a 16-byte boundary take the one-element path."""
    rows = _rows_for(classes)
    s, ts = _logits(rows, classes + 1, dtype, seed=5)
    s_view = s[:, 1:]
    t_view = ts[0][:, 1:]
    assert s_view.data_ptr() % 16 != 0
    _check(backend, s_view, [t_view], _labels(rows, classes, seed=5), alpha=0.5, temperature=2.0)
    # Only the teacher unaligned.
    _check(backend, s[:, :-1].contiguous(), [t_view], temperature=2.0)


@pytest.mark.parametrize("classes", (96, 1024, 4096, 32768))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_rows(backend, dtype, classes):
    """Row strides other than C: padded rows (vectorised), odd padding (one element per access),
    and a [B, L, C] slice addressed with two strides (outer, inner)."""
    rows = _rows_for(classes)
    s, ts = _logits(rows, classes + 64, dtype, seed=9)
    _check(backend, s[:, :classes], [ts[0][:, :classes]], temperature=2.0)
    s, ts = _logits(rows, classes + 3, dtype, seed=9)
    _check(backend, s[:, :classes], [ts[0][:, :classes]], temperature=2.0)
    batch, length = 2, max(2, rows // 2)
    s, ts = _logits(batch * (length + 1), classes, dtype, seed=10, k=2)
    s3 = s.view(batch, length + 1, classes)[:, :-1]
    t3 = [t.view(batch, length + 1, classes)[:, 1:] for t in ts]
    y = _labels(batch * length, classes, seed=10, ignore_every=4).view(batch, length)
    _check(backend, s3, t3, y, alpha=0.5, temperature=2.0, label_smoothing=0.1)


def test_broadcast_teacher_rows(backend):
    """A teacher expanded over the batch (row stride 0) is read in place."""
    s, ts = _logits(16, 1000, torch.float32, seed=12)
    t = ts[0][:1].expand(16, 1000)
    _check(backend, s, [t], temperature=2.0)


# ---- Edge cases ---------------------------------------------------------------------------------


@pytest.mark.parametrize("classes", (100, 4097, 32000))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_vocabulary(backend, dtype, classes):
    """-inf logits (a masked vocabulary): p = 0 contributes 0, also where the student is -inf."""
    rows = _rows_for(classes)
    s, ts = _logits(rows, classes, torch.float32, seed=13)
    mask = torch.zeros(classes, dtype=torch.bool, device="cuda")
    mask[classes // 3 :: 5] = True
    t = ts[0].masked_fill(mask, float("-inf"))
    s_both = s.masked_fill(mask, float("-inf"))
    y = _labels(rows, classes, seed=13)
    y[mask[y]] = 0
    _check(backend, s_both.to(dtype), [t.to(dtype)], y, alpha=0.5, temperature=2.0)
    _check(backend, s.to(dtype), [t.to(dtype)], temperature=1.0)


@pytest.mark.parametrize("classes", (1000, 32000))
def test_large_logits(backend, classes):
    rows = _rows_for(classes)
    s, ts = _logits(rows, classes, torch.float32, seed=14)
    _check(
        backend, s * 5e3, [ts[0] * 5e3], _labels(rows, classes, seed=14), alpha=0.5, temperature=4.0
    )


@pytest.mark.parametrize("classes", (200, 4097, 32000))
@pytest.mark.parametrize("kw", [{}, {"alpha": 0.5}, {"alpha": 0.5, "label_smoothing": 0.1}])
def test_common_offset_keeps_loss_precision(backend, classes, kw):
    """Logits offset by 1e4: the log-sum-exps are combined with the row maxima cancelled first,
    so the loss keeps float32's relative precision (adding them as absolute values loses ~1e-4)."""
    g = torch.Generator(device="cuda").manual_seed(3)
    s = torch.randn(6, classes, device="cuda", generator=g) * 3 + 1e4
    t = torch.randn(6, classes, device="cuda", generator=g) * 3 + 1e4
    y = torch.randint(0, classes, (6,), device="cuda", generator=g)
    loss = fastkd.kd_loss(s, t, y, temperature=1.0, backend=backend, **kw)
    ref = kd_loss_ref(s.double(), t.double(), y, temperature=1.0, **kw)
    # label smoothing averages the raw logits, whose float32 sum is only good to ~1e-7 of 1e4.
    tol = 1e-4 if "label_smoothing" in kw else 1e-5
    assert abs(loss.double() - ref) / ref.abs() < tol, (loss.item(), ref.item())


@pytest.mark.parametrize("classes", (100, 4097, 32000))
def test_rows_without_weight_give_zero(backend, classes):
    """All rows ignored, or guided KD where the teacher is never right: loss 0, gradient 0."""
    rows = _rows_for(classes)
    s, ts = _logits(rows, classes, torch.bfloat16, seed=15)
    ignored = torch.full((rows,), -100, device="cuda")
    for kw in (dict(alpha=0.5), dict(), dict(guided=True)):
        loss, grad = _loss_and_grad(backend, s, ts, ignored, **kw)
        assert loss.item() == 0.0
        assert torch.count_nonzero(grad) == 0
    wrong = (ts[0].float().argmax(-1) + 1) % classes
    loss, grad = _loss_and_grad(backend, s, ts, wrong, guided=True, temperature=2.0)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad) == 0


def _op(
    student,
    teachers,
    labels,
    kd_row_weights=None,
    ce_row_weights=None,
    kd_coefs=None,
    ce_coef=0.0,
    temperature=1.0,
    label_smoothing=0.0,
    per_row=True,
    compute_grad=True,
):
    t3 = [t.unsqueeze(1) for t in teachers]
    coefs = kd_coefs if kd_coefs is not None else [1.0] * len(teachers)
    return torch.ops.fastkd.kd_loss_fwd(
        student.unsqueeze(1),
        t3,
        labels,
        kd_row_weights,
        ce_row_weights,
        coefs,
        ce_coef,
        temperature,
        label_smoothing,
        -100,
        per_row,
        compute_grad,
        [],
        [],
        [],
    )


@needs_cuda_kernels
@pytest.mark.parametrize("classes", (7, 1000, 4097, 32000))
def test_op_matches_cpu_kernel(classes):
    """The op contract row for row: arbitrary row weights (zeros included, shared rows of
    weights with stride 0), CE with smoothing at T != 1, per-row losses."""
    rows = _rows_for(classes)
    s, ts = _logits(rows, classes, torch.float32, seed=16, k=3)
    y = _labels(rows, classes, seed=16)
    g = torch.Generator(device="cuda").manual_seed(17)
    kd_w = torch.rand(3, rows, device="cuda", generator=g)
    kd_w[:, ::4] = 0.0
    kd_w[1, 1::3] = 0.0
    ce_w = torch.rand(rows, device="cuda", generator=g)
    ce_w[::4] = 0.0
    shared = torch.rand(rows, device="cuda", generator=g).expand(3, rows)
    for kd_row_weights in (kd_w, shared):
        args = dict(
            kd_row_weights=kd_row_weights,
            ce_row_weights=ce_w,
            kd_coefs=[0.3, 1.1, 0.7],
            ce_coef=0.4,
            temperature=2.5,
            label_smoothing=0.05,
        )
        loss, grad = _op(s, ts, y, **args)
        cpu_args = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        ref_loss, ref_grad = _op(s.cpu(), [t.cpu() for t in ts], y.cpu(), **cpu_args)
        torch.testing.assert_close(loss.cpu(), ref_loss, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            grad.squeeze(1).cpu(),
            ref_grad.squeeze(1),
            rtol=1e-3,
            atol=1e-6 * ref_grad.abs().max().item(),
        )
        if kd_row_weights is kd_w:  # rows ::4 have no weight at all
            assert (loss[::4] == 0).all()
            assert torch.count_nonzero(grad.squeeze(1)[::4]) == 0


@needs_cuda_kernels
@pytest.mark.parametrize("classes", (100, 4097, 32000))
def test_out_of_range_label_gives_nan_row(classes):
    """CE with a label outside [0, C) cannot raise on the GPU without a sync: that row's loss is
    NaN and its gradient keeps only the KD part; other rows are unaffected."""
    rows = 4
    s, ts = _logits(rows, classes, torch.float32, seed=18)
    y = torch.tensor([0, classes + 5, 2, -100], device="cuda")
    loss, grad = _op(s, ts, y, ce_coef=0.5, temperature=2.0)
    assert torch.isnan(loss[1]) and torch.isnan(loss[3])
    assert torch.isfinite(loss[0::2]).all()
    y_ok = torch.tensor([0, 0, 2, 0])
    ce_w = torch.tensor([1.0, 0.0, 1.0, 0.0])
    ref_loss, ref_grad = _op(
        s.cpu(), [ts[0].cpu()], y_ok, ce_row_weights=ce_w, ce_coef=0.5, temperature=2.0
    )
    torch.testing.assert_close(loss[0::2].cpu(), ref_loss[0::2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        grad.squeeze(1).cpu(),
        ref_grad.squeeze(1),
        rtol=1e-3,
        atol=1e-6 * ref_grad.abs().max().item(),
    )


@pytest.mark.parametrize("backend_or_torch", ("cuda", "triton", "torch"))
@pytest.mark.parametrize(
    "kw", [dict(alpha=0.5), dict(guided=True), dict(guided=True, reduction="none")], ids=str
)
def test_out_of_range_label_makes_the_loss_nan(backend_or_torch, kw):
    """A label outside [0, C) cannot raise on a GPU without a sync: the whole loss is NaN, with
    every option (guided KD alone would otherwise just count the row as a teacher miss)."""
    if backend_or_torch == "cuda" and not WITH_CUDA_KERNELS:
        pytest.skip(NO_CUDA_KERNELS)
    s, ts = _logits(4, 100, torch.float32, seed=28)
    y = ts[0].argmax(-1)
    y[2] = 100
    loss = fastkd.kd_loss(s, ts, y, temperature=2.0, backend=backend_or_torch, **kw)
    assert torch.isnan(loss).all(), loss
    y[2] = -100
    loss = fastkd.kd_loss(s, ts, y, temperature=2.0, backend=backend_or_torch, **kw)
    assert torch.isfinite(loss).all(), loss


@pytest.mark.parametrize("classes", (1000, 32000))
def test_without_grad_writes_no_gradient(backend, classes):
    s, ts = _logits(5, classes, torch.bfloat16, seed=19)
    with torch.no_grad():
        loss = fastkd.kd_loss(s, ts, backend=backend, temperature=2.0)
    ref = kd_loss_ref(s.double(), [t.double() for t in ts], temperature=2.0)
    torch.testing.assert_close(loss.double(), ref, **LOSS_TOL)
    _, grad = _op(s, ts, None, compute_grad=False)
    assert grad.numel() == 0


@needs_cuda_kernels
@pytest.mark.parametrize("per_row", (False, True))
def test_opcheck(per_row):
    s, ts = _logits(6, 100, torch.bfloat16, seed=27, k=2)
    # The op is a pure function (fastkd.kd_loss differentiates it with an autograd.Function), so
    # every opcheck test applies to the inputs it is called with.
    s3 = s.unsqueeze(1)
    y = _labels(6, 100, seed=27)
    args = (s3, [t.unsqueeze(1) for t in ts], y, None, None, [1.0, 0.5], 0.5, 2.0, 0.1, -100)
    for compute_grad in (False, True):
        torch.library.opcheck(torch.ops.fastkd.kd_loss_fwd,
                              (*args, per_row, compute_grad, [], [], []))
    grad = _grad((6, 1, 100), torch.bfloat16)
    torch.library.opcheck(torch.ops.fastkd.scale_grad_, (grad, torch.tensor(2.0, device="cuda")))
    torch.library.opcheck(torch.ops.fastkd.scale_grad_, (grad, torch.rand(6, device="cuda")))


@needs_cuda_kernels
def test_float64_is_refused(backend):
    s = torch.randn(4, 10, device="cuda", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        _op(s, [s], None)
    with pytest.raises(ValueError, match="float64 runs on the CPU backend only"):
        fastkd.kd_loss(s, s, backend=backend)


@pytest.mark.parametrize("classes", (7, 100))
def test_many_rows(backend, classes):
    rows = (1 << 20) + 3
    s, ts = _logits(rows, classes, torch.bfloat16, seed=25)
    _check(
        backend, s, ts, _labels(rows, classes, seed=25, ignore_every=7), alpha=0.5, temperature=2.0
    )


@pytest.mark.slow
@pytest.mark.parametrize("classes", (4096, 32768))
def test_offsets_beyond_int32(backend, classes):
    """rows x C > 2^31: the last rows (offsets past 2^31 elements) match the same rows computed
    alone, bitwise."""
    rows = (1 << 31) // classes + 8
    g = torch.Generator(device="cuda").manual_seed(26)
    s = torch.randn(rows, classes, device="cuda", dtype=torch.bfloat16, generator=g)
    t = torch.randn(rows, classes, device="cuda", dtype=torch.bfloat16, generator=g)
    y = torch.randint(0, classes, (rows,), device="cuda", generator=g)
    kw = dict(alpha=0.5, temperature=2.0, reduction="none")
    loss, grad = _loss_and_grad(backend, s, [t], y, **kw)
    tail_loss, tail_grad = _loss_and_grad(backend, s[-8:], [t[-8:]], y[-8:], **kw)
    assert torch.equal(loss[-8:], tail_loss)
    assert torch.equal(grad[-8:], tail_grad)
    ref_loss, _ = _ref_loss_and_grad(s[-8:], [t[-8:]], y[-8:], **kw)
    torch.testing.assert_close(tail_loss.double(), ref_loss, **LOSS_TOL)


# ---- No host sync, CUDA graphs, determinism ----------------------------------------------------


@pytest.mark.parametrize("classes", (1000, 32000))
@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=2.0),
        dict(alpha=0.5, label_smoothing=0.1, guided=True),
        dict(alpha=0.5, reduction="none"),
    ],
    ids=("kd", "ce-guided", "none"),
)
def test_no_host_sync(backend, classes, options):
    rows = 8
    s, ts = _logits(rows, classes, torch.bfloat16, seed=20, k=2)
    y = _labels(rows, classes, seed=20, ignore_every=3)
    go = torch.rand(rows, device="cuda") if options.get("reduction") == "none" else None
    _loss_and_grad(backend, s, ts, y, go, **options)  # warm-up: lazy initialisation may sync
    torch.cuda.synchronize()
    x = s.detach().clone().requires_grad_(True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fastkd.kd_loss(x, ts, y, backend=backend, **options)
        if go is None:
            loss.backward()
        else:
            loss.backward(go)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("classes", (1000, 32000))
@pytest.mark.parametrize("reduction", ("batchmean", "none"))
def test_cuda_graph_capture_and_replay(backend, classes, reduction):
    rows = 12
    s0, ts0 = _logits(rows, classes, torch.float32, seed=21, k=2)
    y0 = _labels(rows, classes, seed=21, ignore_every=4)
    static_s = s0.clone().requires_grad_(True)
    static_t = [t.clone() for t in ts0]
    static_y = y0.clone()
    static_go = torch.rand(rows, device="cuda") + 0.5
    kw = dict(alpha=0.4, temperature=2.0, label_smoothing=0.1, reduction=reduction)

    def step():
        static_s.grad = None
        loss = fastkd.kd_loss(static_s, static_t, static_y, backend=backend, **kw)
        loss.backward(static_go if reduction == "none" else None)
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    static_s.grad = None
    with torch.cuda.graph(graph):
        static_loss = step()

    for seed in (22, 23):
        s1, ts1 = _logits(rows, classes, torch.float32, seed=seed, k=2)
        y1 = _labels(rows, classes, seed=seed, ignore_every=3)
        with torch.no_grad():
            static_s.copy_(s1)
            for dst, src in zip(static_t, ts1, strict=True):
                dst.copy_(src)
            static_y.copy_(y1)
        graph.replay()
        torch.cuda.synchronize()
        loss, grad = _loss_and_grad(
            backend, s1, ts1, y1, static_go if reduction == "none" else None, **kw
        )
        assert torch.equal(static_loss, loss)
        assert torch.equal(static_s.grad, grad)


# Shapes for the CUDA split kernel (forward KL, dense teachers, C > 8192) that make its launch plan
# (csrc/cuda/kd_loss_kernels.cuh, plan_split) pick each cluster size on an H100/H200 (132 SMs,
# 50 MiB L2) in bf16 with one teacher: rows that fill the GPU and fit the L2 (1 CTA per row), rows
# that need 2, 4 and 8 CTAs to fit it, few rows (8 CTAs to fill the SMs), and an odd C (one element
# per access, uneven slices).
SPLIT_SHAPES = [(300, 8200), (300, 20000), (300, 40000), (300, 131072), (3, 262144), (5, 65537)]


@needs_cuda_kernels
@pytest.mark.parametrize("rows,classes", SPLIT_SHAPES, ids=str)
@pytest.mark.parametrize("k", (1, 3))
def test_split_rows_match_reference(rows, classes, k):
    # The CUDA kernel's plan only (tests/test_cuda_launch_plan.py checks the sizes it picks).
    s, ts = _logits(rows, classes, torch.bfloat16, seed=classes + k, k=k)
    y = _labels(rows, classes, seed=classes, ignore_every=7)
    _check("cuda", s, ts, y, alpha=0.5, temperature=2.0, label_smoothing=0.1)
    first = _loss_and_grad("cuda", s, ts, y, alpha=0.5, temperature=2.0)
    again = _loss_and_grad("cuda", s, ts, y, alpha=0.5, temperature=2.0)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("classes", (100, 4097, 32000, 262144))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_bitwise_deterministic(backend, dtype, classes):
    rows = _rows_for(classes)
    s, ts = _logits(rows, classes, dtype, seed=24, k=3)
    y = _labels(rows, classes, seed=24, ignore_every=5)
    kw = dict(alpha=0.5, temperature=2.0, label_smoothing=0.1, teacher_weights=[1.0, 0.5, 2.0])
    first = _loss_and_grad(backend, s, ts, y, **kw)
    for _ in range(3):
        again = _loss_and_grad(backend, s, ts, y, **kw)
        assert torch.equal(first[0], again[0])
        assert torch.equal(first[1], again[1])


# ---- scale_grad_ -----------------------------------------------------------------------------

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _grad(shape, dtype, seed=0, offset=0):
    """A contiguous gradient; `offset` elements into its buffer (offset 1: not 16-byte aligned)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    buf = torch.randn(n + offset, device="cuda", generator=g).to(dtype)
    return buf[offset:].view(shape)


@needs_cuda_kernels
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 1, 7), (5, 2, 1000), (1, 1, 1), (4, 1, 32003)])
@pytest.mark.parametrize("offset", (0, 1))
@pytest.mark.parametrize("go_dtype", (torch.float32, torch.float64), ids=str)
def test_scale_grad(dtype, shape, offset, go_dtype):
    grad = _grad(shape, dtype, offset=offset)
    before = grad.clone()
    one = torch.tensor(1.0, device="cuda", dtype=go_dtype)
    torch.ops.fastkd.scale_grad_(grad, one)
    assert torch.equal(grad, before)

    factor = torch.tensor(2.5, device="cuda", dtype=go_dtype)
    torch.ops.fastkd.scale_grad_(grad, factor)
    expected = (before.to(torch.float64) * 2.5).to(dtype)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)

    rows = grad.numel() // shape[-1]
    per_row = torch.linspace(-2.0, 3.0, rows, device="cuda", dtype=go_dtype)
    grad.copy_(before)
    torch.ops.fastkd.scale_grad_(grad, per_row)
    math = torch.float64 if dtype == torch.float64 else torch.float32
    expected = (
        before.to(math) * per_row.to(math).view(-1, 1).expand(rows, shape[-1]).reshape(shape)
    ).to(dtype)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)


@needs_cuda_kernels
def test_scale_grad_reads_the_scalar_on_the_device():
    """Captured with grad_output = 1 and replayed after it changed (and the other way round): the
    kernel decides on the device at replay time, so neither capture bakes the value in."""
    for captured, replayed in ((1.0, 2.5), (2.5, 1.0)):
        grad = _grad((6, 1, 1000), torch.bfloat16, seed=1)
        before = grad.clone()
        go = torch.tensor(captured, device="cuda")
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            torch.ops.fastkd.scale_grad_(grad, go)
        grad.copy_(before)  # capture does not run the kernel; make the starting point explicit
        go.fill_(replayed)
        graph.replay()
        torch.cuda.synchronize()
        expected = before if replayed == 1.0 else (before.float() * replayed).to(torch.bfloat16)
        assert torch.equal(grad, expected)


@needs_cuda_kernels
def test_scale_grad_without_host_sync():
    grad = _grad((64, 1, 4096), torch.float16)
    go = torch.tensor(1.0, device="cuda")
    per_row = torch.rand(64, device="cuda")
    torch.ops.fastkd.scale_grad_(grad, per_row)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ops.fastkd.scale_grad_(grad, go)
        torch.ops.fastkd.scale_grad_(grad, per_row)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda_kernels
def test_scale_grad_rejects_bad_grad_output():
    grad = _grad((4, 1, 10), torch.float32)
    with pytest.raises(RuntimeError, match="one value per row"):
        torch.ops.fastkd.scale_grad_(grad, torch.ones(3, device="cuda"))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.fastkd.scale_grad_(grad, torch.ones((), device="cuda", dtype=torch.float16))
