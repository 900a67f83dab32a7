"""fastkd.linear_kd_loss / fastkd.nn.LinearKDLoss: the fused output head + KD loss against the
unfused composition ``kd_loss(h @ W.T + b, teacher)`` (value and the gradients of h, W and b), for
every teacher form, dtype, divergence and chunking; opcheck of the chunk-loop op, torch.compile,
the backward's scaling, and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS
from kd_helpers import IGNORE, INTERPRETER_NOISE, _seed  # noqa: F401
from torch.library import opcheck

import fastkd
from fastkd.functional.linear_kd_loss import default_chunk_size

pytestmark = INTERPRETER_NOISE

F64 = torch.float64
TEACHERS = ("linear", "dense", "sparse")
# Odd rows and classes; chunk sizes that do not divide N = 37 (and one larger than N).
N, H, HT, C = 37, 16, 12, 53


def _inputs(dtype, teacher_kind, *, bias=True, lead=(N,), ignore=True, k=6):
    """Student head (h, W, b) requiring grad, the teacher in form `teacher_kind`, its dense
    float64 logits (what the unfused composition sees), and labels (every 4th row ignored)."""
    h = torch.randn(*lead, H).to(dtype).requires_grad_()
    w = (torch.randn(C, H) * 0.4).to(dtype).requires_grad_()
    b = (torch.randn(C) * 0.5).to(dtype).requires_grad_() if bias else None
    th = torch.randn(*lead, HT).to(dtype)
    tw = (torch.randn(C, HT) * 0.5).to(dtype)
    tb = (torch.randn(C) * 0.5).to(dtype)
    y = torch.randint(0, C, lead)
    if ignore:
        y.view(-1)[::4] = IGNORE
    dense = (th.double() @ tw.double().T + tb.double()).to(dtype)
    if teacher_kind == "linear":
        teacher = fastkd.LinearTeacher(th, tw, tb)
        oracle = th.double() @ tw.double().T + tb.double()
    elif teacher_kind == "dense":
        teacher, oracle = dense, dense.double()
    else:
        teacher = fastkd.SparseTeacher.from_logits(dense.float(), k=k)
        oracle = teacher
    return h, w, b, teacher, oracle, y


def _grads(loss, tensors):
    loss.backward()
    out = [None if t is None else t.grad.clone() for t in tensors]
    for t in tensors:
        if t is not None:
            t.grad = None
    return out


def _oracle(h, w, b, oracle, y, **kw):
    """The unfused composition in float64 on the same (rounded) values, with autograd."""
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    logits = h64 @ w64.T + (0 if b64 is None else b64)
    loss = fastkd.kd_loss(logits, oracle, y, backend="torch", **kw)
    return loss.detach(), _grads(loss, [h64, w64, b64])


def _close(got, want, rel):
    """Max abs error within `rel` of the reference's max magnitude (per tensor)."""
    scale = want.abs().max().item() or 1.0
    err = (got.double() - want).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel:g} x {scale:.3g}"


def _check(dtype, teacher_kind, backend, *, bias=True, chunk_size=8, lead=(N,), **kw):
    h, w, b, teacher, oracle, y = _inputs(dtype, teacher_kind, bias=bias, lead=lead)
    loss = fastkd.linear_kd_loss(
        h, w, teacher, y, student_bias=b, chunk_size=chunk_size, backend=backend, **kw
    )
    assert loss.dtype == (F64 if dtype == F64 else torch.float32) and loss.dim() == 0
    got = _grads(loss, [h, w, b])
    want_loss, want = _oracle(h, w, b, oracle, y, **kw)
    # bf16: the logits are rounded to bf16 before the loss (the oracle keeps them in float64).
    rel = 3e-2 if dtype == torch.bfloat16 else 1e-5
    assert abs(loss.item() - want_loss.item()) <= rel * max(1.0, abs(want_loss.item()))
    for g, r, t in zip(got, want, (h, w, b), strict=True):
        if t is None:
            assert g is None and r is None
            continue
        assert g.dtype == t.dtype and g.shape == t.shape
        _close(g, r, rel)
    return loss, got, (h, w, b, teacher, y)


KD = {"temperature": 2.0}
MIXED = {"temperature": 3.0, "alpha": 0.4, "label_smoothing": 0.1}


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("teacher_kind", TEACHERS)
def test_against_unfused(teacher_kind, dtype, bias, backend):
    _check(dtype, teacher_kind, backend, bias=bias, **MIXED)


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 36, 37, 64, None])
def test_chunk_sizes(chunk_size):
    _check(torch.float32, "linear", "cpu", chunk_size=chunk_size, **MIXED)


@pytest.mark.parametrize("teacher_kind", TEACHERS)
def test_same_dtype_composition_fp32(teacher_kind):
    """fp32 against kd_loss on materialised fp32 logits with the same kernel: equal up to the
    matmuls' summation order."""
    h, w, b, teacher, _, y = _inputs(torch.float32, teacher_kind)
    loss = fastkd.linear_kd_loss(h, w, teacher, y, student_bias=b, chunk_size=10, **MIXED)
    got = _grads(loss, [h, w, b])
    t = teacher
    if teacher_kind == "linear":
        t = teacher.hidden @ teacher.weight.T + teacher.bias
    ref = fastkd.kd_loss(h @ w.T + b, t, y, **MIXED)
    want = _grads(ref, [h, w, b])
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_float64():
    _check(F64, "linear", "cpu", **MIXED)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_language_model_shape(backend):
    """[B, L, H] hidden states with ignored labels (prompt/padding), chunk_size=None."""
    _check(torch.bfloat16, "linear", backend, lead=(3, 29), chunk_size=None, **MIXED)
    _check(torch.float32, "dense", backend, lead=(3, 29), chunk_size=None, **KD)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_reductions(reduction):
    _check(torch.float32, "linear", "cpu", reduction=reduction, **MIXED)


def test_without_labels():
    h, w, b, teacher, oracle, _ = _inputs(torch.float32, "linear")
    loss = fastkd.linear_kd_loss(h, w, teacher, student_bias=b, chunk_size=7, temperature=2.0)
    got = _grads(loss, [h, w, b])
    want_loss, want = _oracle(h, w, b, oracle, None, temperature=2.0)
    assert abs(loss.item() - want_loss.item()) <= 1e-5 * abs(want_loss.item())
    for g, r in zip(got, want, strict=True):
        _close(g, r, 1e-5)


@pytest.mark.parametrize("teacher_kind", TEACHERS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_divergences(backend, divergence, teacher_kind, dtype=torch.float32):
    kw = dict(MIXED, divergence=divergence, beta=0.3)
    _check(dtype, teacher_kind, backend, **kw)


@pytest.mark.parametrize("divergence", ["reverse_kl", "jsd"])
def test_divergences_bf16(divergence):
    _check(torch.bfloat16, "linear", "cpu", divergence=divergence, beta=0.7, **KD)


def _on(device, teacher):
    """The teacher, in any of its forms, on `device`."""
    if isinstance(teacher, fastkd.LinearTeacher):
        bias = None if teacher.bias is None else teacher.bias.to(device)
        return fastkd.LinearTeacher(teacher.hidden.to(device), teacher.weight.to(device), bias)
    if isinstance(teacher, fastkd.SparseTeacher):
        return fastkd.SparseTeacher(teacher.indices.to(device), teacher.values.to(device),
                                    kind=teacher.kind, tail=teacher.tail)
    return teacher.to(device)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
@pytest.mark.parametrize("teacher_kind", TEACHERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backends_match_the_cpu(backend, dtype, teacher_kind, divergence):
    """CUDA tensors on each GPU backend against the CPU run (itself checked against the unfused
    float64 composition above): the loss and the gradients of h, W and b."""
    kw = dict(MIXED, divergence=divergence, chunk_size=16)
    h, w, b, teacher, _, y = _inputs(dtype, teacher_kind)
    cpu_loss = fastkd.linear_kd_loss(h, w, teacher, y, student_bias=b, backend="cpu", **kw)
    cpu = _grads(cpu_loss, [h, w, b])
    on_gpu = [t.detach().cuda().requires_grad_() for t in (h, w, b)]
    loss = fastkd.linear_kd_loss(on_gpu[0], on_gpu[1], _on("cuda", teacher), y.cuda(),
                                 student_bias=on_gpu[2], backend=backend, **kw)
    got = _grads(loss, on_gpu)
    rel = 3e-2 if dtype == torch.bfloat16 else 1e-4
    assert abs(loss.item() - cpu_loss.item()) <= rel * max(1.0, abs(cpu_loss.item()))
    for g, want in zip(got, cpu, strict=True):
        _close(g.cpu(), want.double(), rel)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton cannot run here")
def test_triton_backend():
    _check(torch.float32, "linear", "triton", chunk_size=16, **MIXED)


def test_grad_output_scales_every_gradient():
    h, w, b, teacher, _, y = _inputs(torch.float32, "linear")
    kw = dict(MIXED, chunk_size=9)
    once = _grads(fastkd.linear_kd_loss(h, w, teacher, y, student_bias=b, **kw), [h, w, b])
    loss = fastkd.linear_kd_loss(h, w, teacher, y, student_bias=b, **kw)
    scaled = _grads(loss * -2.5, [h, w, b])
    for g, r in zip(scaled, once, strict=True):
        torch.testing.assert_close(g, -2.5 * r)


def test_second_backward_is_refused():
    h, w, b, teacher, _, y = _inputs(torch.float32, "linear")
    loss = fastkd.linear_kd_loss(h, w, teacher, y, student_bias=b, **MIXED)
    (loss * 2).backward(retain_graph=True)
    with pytest.raises(RuntimeError):
        (loss * 2).backward()


@pytest.mark.parametrize("needs", ["hidden", "weight", "bias", "none"])
def test_only_needed_gradients(needs):
    h, w, b, teacher, oracle, y = _inputs(torch.float32, "linear")
    for name, t in (("hidden", h), ("weight", w), ("bias", b)):
        t.requires_grad_(name == needs)
    loss = fastkd.linear_kd_loss(h, w, teacher, y, student_bias=b, **MIXED)
    want_loss, want = _oracle(h, w, b, oracle, y, **MIXED)
    assert abs(loss.item() - want_loss.item()) <= 1e-5 * abs(want_loss.item())
    assert loss.requires_grad == (needs != "none")
    if needs == "none":
        return
    loss.backward()
    for name, t, r in zip(("hidden", "weight", "bias"), (h, w, b), want, strict=True):
        if name == needs:
            _close(t.grad, r, 1e-5)
        else:
            assert t.grad is None


def test_no_grad_mode():
    h, w, b, teacher, _, y = _inputs(torch.float32, "dense")
    with torch.no_grad():
        loss = fastkd.linear_kd_loss(h, w, teacher, y, student_bias=b, **MIXED)
    ref = fastkd.linear_kd_loss(h, w, teacher, y, student_bias=b, **MIXED)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref.detach())


def test_teacher_requiring_grad_is_not_differentiated():
    h, w, b, _, _, y = _inputs(torch.float32, "linear")
    th = torch.randn(N, HT, requires_grad=True)
    tw = torch.randn(C, HT, requires_grad=True)
    loss = fastkd.linear_kd_loss(h, w, fastkd.LinearTeacher(th, tw), y, **MIXED)
    loss.backward()
    assert th.grad is None and tw.grad is None and h.grad is not None


def test_module_matches_functional():
    h, w, b, teacher, _, y = _inputs(torch.float32, "linear")
    crit = fastkd.nn.LinearKDLoss(
        chunk_size=11, divergence="jsd", beta=0.2, backend="torch", **MIXED
    )
    assert "chunk_size=11" in repr(crit) and "beta=0.2" in repr(crit)
    got = _grads(crit(h, w, teacher, y, b), [h, w, b])
    fn = fastkd.linear_kd_loss(
        h, w, teacher, y, student_bias=b, chunk_size=11, divergence="jsd", beta=0.2,
        backend="torch", **MIXED,
    )
    want = _grads(fn, [h, w, b])
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r)


def test_default_chunk_size_rule():
    assert default_chunk_size(4096, 1024, 32000) == 512
    assert default_chunk_size(8192, 4096, 128256) == 1024
    assert default_chunk_size(4096, 4096, 128256) == 512
    assert default_chunk_size(65536, 4096, 128256) == 1024  # capped
    assert default_chunk_size(37, 16, 53) == 37  # fewer rows than the 256-row floor
    assert default_chunk_size(100000, 64, 128256) == 256  # the floor


# --- opcheck and torch.compile ---------------------------------------------------------------


def _op_args(teacher_kind, dtype=torch.float32, bias=True, flags=(True, True, True)):
    from fastkd.functional.kd_loss import _plan

    h, w, b, teacher, _, y = _inputs(dtype, teacher_kind, bias=bias)
    h, w = h.detach(), w.detach()
    b = None if b is None else b.detach()
    kd_coefs, ce_coef, kd_rw, ce_rw = _plan(
        torch.empty(()).expand(1, N, C), None, 1, y, 2.0, 0.4, IGNORE, [1.0], "batchmean"
    )
    th = tw = tb = tl = ids = vals = tails = None
    if teacher_kind == "linear":
        th, tw, tb = teacher.hidden, teacher.weight, teacher.bias
    elif teacher_kind == "dense":
        tl = teacher
    else:
        ids, vals, tails = teacher._for_kernel(C, torch.float32)
    return (
        h, w, b, th, tw, tb, tl, ids, vals, tails, y, kd_rw.contiguous(), ce_rw, kd_coefs[0],
        ce_coef, 2.0, 0.1, IGNORE, 0, 0.5, 10, "cpu", list(flags),
    )


@pytest.mark.parametrize(
    "teacher_kind,dtype,bias,flags",
    [
        ("linear", torch.float32, True, (True, True, True)),
        ("dense", torch.float32, False, (True, False, False)),
        ("sparse", torch.float32, True, (False, True, True)),
        ("linear", torch.bfloat16, True, (True, True, True)),
        ("linear", torch.float32, True, (False, False, False)),
    ],
)
def test_opcheck(teacher_kind, dtype, bias, flags):
    opcheck(torch.ops.fastkd.linear_kd_loss_fwd, _op_args(teacher_kind, dtype, bias, flags))


@pytest.mark.parametrize("teacher_kind", TEACHERS)
def test_compile_fullgraph(teacher_kind):
    h, w, b, teacher, _, y = _inputs(torch.float32, teacher_kind, lead=(2, 19))

    def f(h, w, b, teacher, y):
        return fastkd.linear_kd_loss(h, w, teacher, y, student_bias=b, chunk_size=8, **MIXED)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    loss = compiled(h, w, b, teacher, y)
    got = _grads(loss * 1.5, [h, w, b])
    ref = f(h, w, b, teacher, y)
    want = _grads(ref * 1.5, [h, w, b])
    torch.testing.assert_close(loss, ref)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r)


# --- bad input -------------------------------------------------------------------------------


def _good():
    h, w, b, teacher, _, y = _inputs(torch.float32, "linear")
    return h, w, b, teacher, y


def test_bad_head():
    h, w, b, teacher, y = _good()
    with pytest.raises(ValueError, match="mismatched H"):
        fastkd.linear_kd_loss(h[:, :-1], w, teacher, y)
    with pytest.raises(ValueError, match="2-D"):
        fastkd.linear_kd_loss(h, w[None], teacher, y)
    with pytest.raises(ValueError, match="2-D"):
        fastkd.linear_kd_loss(h, w[0], teacher, y)
    with pytest.raises(ValueError, match="mismatched C"):
        fastkd.linear_kd_loss(h, w, teacher, y, student_bias=b[:-1])
    with pytest.raises(TypeError, match="dtype"):
        fastkd.linear_kd_loss(h, w.detach().double(), teacher, y)
    with pytest.raises(TypeError, match="dtype"):
        fastkd.linear_kd_loss(h, w, teacher, y, student_bias=b.detach().bfloat16())
    with pytest.raises(TypeError, match="student_weight must be a torch.Tensor"):
        fastkd.linear_kd_loss(h, [[1.0]], teacher, y)
    with pytest.raises(ValueError, match="empty batch"):
        fastkd.linear_kd_loss(h[:0], w, teacher, y[:0])


def test_bad_teacher():
    h, w, b, teacher, y = _good()
    dense = torch.randn(N, C)
    with pytest.raises(ValueError, match="mismatched class count"):
        fastkd.linear_kd_loss(h, w, dense[:, :-1], y)
    with pytest.raises(ValueError, match="mismatched leading dims"):
        fastkd.linear_kd_loss(h, w, dense[:-1], y)
    with pytest.raises(ValueError, match="mismatched C"):
        fastkd.linear_kd_loss(h, w, fastkd.LinearTeacher(teacher.hidden, teacher.weight[:-1]), y)
    with pytest.raises(ValueError, match="mismatched leading dims"):
        fastkd.linear_kd_loss(h, w, fastkd.LinearTeacher(teacher.hidden[:-1], teacher.weight), y)
    with pytest.raises(ValueError, match="mismatched leading dims"):
        fastkd.linear_kd_loss(h, w, fastkd.SparseTeacher.from_logits(dense[:-1], k=3), y)
    with pytest.raises(ValueError, match="k = 60"):
        fastkd.linear_kd_loss(
            h, w, fastkd.SparseTeacher.from_logits(torch.randn(N, 60), k=60), y
        )
    with pytest.raises(TypeError, match="cohorts"):
        fastkd.linear_kd_loss(h, w, [dense, dense], y)
    with pytest.raises(TypeError, match="LinearTeacher"):
        fastkd.linear_kd_loss(h, w, "teacher", y)
    with pytest.raises(TypeError, match="float64"):
        fastkd.linear_kd_loss(h, w, dense.double(), y)
    with pytest.raises(ValueError, match="reverse_kl"):
        fastkd.linear_kd_loss(
            h, w, fastkd.SparseTeacher.from_logits(dense, k=3, kind="logits"),
            divergence="reverse_kl",
        )


def test_bad_linear_teacher():
    th, tw = torch.randn(N, HT), torch.randn(C, HT)
    with pytest.raises(ValueError, match="2-D"):
        fastkd.LinearTeacher(th, tw[None])
    with pytest.raises(ValueError, match="mismatched H"):
        fastkd.LinearTeacher(th[:, :-1], tw)
    with pytest.raises(ValueError, match="mismatched C"):
        fastkd.LinearTeacher(th, tw, torch.randn(C + 1))
    with pytest.raises(TypeError, match="dtype"):
        fastkd.LinearTeacher(th, tw.bfloat16())
    with pytest.raises(TypeError, match="torch.Tensor"):
        fastkd.LinearTeacher(th, None)
    assert "LinearTeacher(hidden=(37, 12)" in repr(fastkd.LinearTeacher(th, tw))


def test_bad_options():
    h, w, b, teacher, y = _good()
    with pytest.raises(ValueError, match="reduction='none'"):
        fastkd.linear_kd_loss(h, w, teacher, y, reduction="none")
    with pytest.raises(ValueError, match="reduction='none'"):
        fastkd.nn.LinearKDLoss(reduction="none")
    with pytest.raises(ValueError, match="chunk_size"):
        fastkd.linear_kd_loss(h, w, teacher, y, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        fastkd.nn.LinearKDLoss(chunk_size=2.0)
    with pytest.raises(ValueError, match="pass labels"):
        fastkd.linear_kd_loss(h, w, teacher, alpha=0.5)
    with pytest.raises(ValueError, match="labels must have shape"):
        fastkd.linear_kd_loss(h, w, teacher, y[:-1])
    with pytest.raises(ValueError, match="temperature"):
        fastkd.linear_kd_loss(h, w, teacher, y, temperature=0.0)
    with pytest.raises(ValueError, match="divergence"):
        fastkd.linear_kd_loss(h, w, teacher, y, divergence="kl")
    with pytest.raises(ValueError):
        fastkd.linear_kd_loss(h, w, teacher, y, beta=1.0, divergence="jsd")


def test_out_of_range_label_raises_on_cpu():
    h, w, b, teacher, y = _good()
    y = y.clone()
    y[-1] = C
    with pytest.raises((RuntimeError, ValueError)):
        fastkd.linear_kd_loss(h, w, teacher, y, chunk_size=8, **MIXED)


# --- Liger-Kernel's forward-KL setting ------------------------------------------------------


def test_liger_forward_kl_setting_matches():
    """LigerFusedLinearJSDLoss with beta=0 is KL(teacher || student) over the non-ignored tokens,
    without the T^2 factor: fastkd's forward KL divided by T^2 (the benchmark's peer)."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    h, w, _, teacher, _, y = _inputs(torch.float32, "linear", bias=False)
    T = 2.0
    ours = fastkd.linear_kd_loss(h, w, fastkd.LinearTeacher(teacher.hidden, teacher.weight), y,
                                 temperature=T)
    got = _grads(ours, [h, w])
    crit = liger.LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=T, compiled=False,
        chunk_size=8,
    )
    theirs = crit(h, w, teacher.hidden, teacher.weight, y)
    want = _grads(theirs, [h, w])
    torch.testing.assert_close(ours / T**2, theirs, rtol=1e-5, atol=1e-6)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g / T**2, r, rtol=1e-4, atol=1e-6)


def test_bench_head_runs(tmp_path):
    """`python -m fastkd bench-head` on a tiny case: a fresh process per case for the memory, one
    for the interleaved times, every implementation's loss equal to fastkd's."""
    import json

    from fastkd.benchmark.linear_kd_loss import main

    out = tmp_path / "head.json"
    assert main([
        "--shape", "64x8x50", "--dtype", "fp32", "--impl", "fastkd", "fastkd-unfused", "eager",
        "--rounds", "2", "--threads", "1", "--json", str(out),
    ]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["impl"] for r in results] == ["fastkd", "fastkd-unfused", "eager"]
    for r in results:
        assert len(r["times_s"]) == 2 and r["peak_extra_bytes"] >= 0
        assert abs(r["value"] - results[0]["value"]) <= 1e-5 * abs(results[0]["value"])
