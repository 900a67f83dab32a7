"""fastkd.feature_regression_loss on every backend against the float64 reference.

Backends that run here: conftest.CPU_BACKENDS (C++ CPU, Triton under the interpreter, torch); the
CUDA C++ and Triton-on-GPU tests at the end are marked ``cuda`` and skipped without a GPU.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import CPU_BACKENDS, CUDA
from hypothesis import given
from hypothesis import strategies as st
from machine import CPU_CAPABILITIES, skip_unless_cpu_runs
from torch.utils._python_dispatch import TorchDispatchMode

import fastkd
from fastkd.reference import feature_regression_loss_ref

OPTIONS = [(p, normalize) for p in (1, 2) for normalize in (False, True)]
# Relative tolerance of the loss, and of the gradient relative to its largest entry, per dtype
# of the student (the gradient is stored in that dtype) -- one table for every test.
TOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 2e-3,
}


def _feats(shape, dtype=torch.float32, seed=0, memory_format=torch.contiguous_format, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(shape, generator=g, dtype=base) * scale).to(dtype)
    if len(shape) == 4:
        x = x.contiguous(memory_format=memory_format)
    return x


def _pairs(shapes, dtype=torch.float32, teacher_dtype=None, memory_format=torch.contiguous_format,
           scale=1.0, seed=0):
    students = [
        _feats(s, dtype, seed + 2 * i, memory_format, scale).requires_grad_()
        for i, s in enumerate(shapes)
    ]
    teachers = [
        _feats(s, teacher_dtype or dtype, seed + 2 * i + 1, memory_format, scale)
        for i, s in enumerate(shapes)
    ]
    return students, teachers


def _reference(students, teachers, grad_output=1.0, **kw):
    """Loss and student gradients in float64, from the inputs as given (already rounded)."""
    s64 = [s.detach().double().requires_grad_() for s in students]
    t64 = [t.detach().double() for t in teachers]
    loss = feature_regression_loss_ref(s64, t64, **kw)
    (loss * grad_output).backward()
    return loss.detach(), [s.grad for s in s64]


@torch.no_grad()
def _magnitude(students, teachers, **kw):
    """Scales of the rounding errors of the loss and of each gradient that stay meaningful where
    the loss or a gradient is close to 0: the loss with every difference replaced by |a| + |b|,
    and the size of one element's gradient term."""
    s64 = [s.detach().double().abs() for s in students]
    t64 = [-t.detach().double().abs() for t in teachers]
    loss = feature_regression_loss_ref(s64, t64, **kw)
    p, weights = kw.get("p", 2), kw.get("weights") or [1.0] * len(students)
    floors = []
    for s, t, w in zip(s64, t64, weights, strict=True):
        f = w * p / (s.numel() if kw.get("reduction", "mean") == "mean" else 1)
        if kw.get("normalize"):
            f /= s.flatten(1).norm(dim=1).clamp_min(1e-12).min().item()
        elif p == 2:
            f *= (s - t).abs().max().item()
        floors.append(f)
    return loss.item(), floors


def _check(students, teachers, backend, grad_output=1.0, **kw):
    loss = fastkd.feature_regression_loss(students, teachers, backend=backend, **kw)
    f64 = students[0].dtype == torch.float64
    assert loss.dtype == (torch.float64 if f64 else torch.float32)
    assert loss.shape == ()
    (loss * grad_output).backward()
    ref_loss, ref_grads = _reference(students, teachers, grad_output, **kw)
    tol = TOL[students[0].dtype]
    loss_scale, grad_scales = _magnitude(students, teachers, **kw)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=tol * loss_scale)
    for s, t, ref, g_scale in zip(students, teachers, ref_grads, grad_scales, strict=True):
        assert s.grad.dtype == s.dtype
        assert s.grad.stride() == s.stride(), "the gradient must have the student's layout"
        scale = max(ref.abs().max().item(), abs(grad_output) * g_scale)
        got = s.grad.double()
        if kw.get("p", 2) == 1 and kw.get("normalize"):
            # sign(n(a) - n(b)) flips where the normalised values tie within float32 rounding;
            # there the gradient may differ by one sign step (2 c / ||a||), nowhere else.
            ties = _near_ties(s, t).view(s.shape)
            step = 2.5 * abs(grad_output) * g_scale
            assert torch.all((got - ref).abs()[ties] <= step)
            got, ref = got[~ties], ref[~ties]
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * scale)
    return loss


def _near_ties(s, t):
    u = torch.nn.functional.normalize(s.detach().double().flatten(1), dim=1)
    v = torch.nn.functional.normalize(t.detach().double().flatten(1), dim=1)
    return (u - v).abs() <= 1e-6 * (u.abs() + v.abs())


# ---------------------------------------------------------------------------------------------
# Every backend x option x reduction, lists of pairs with weights.

SMALL_SHAPES = [(2, 3, 4, 5), (3, 40), (2, 5, 7)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p,normalize", OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_reference(backend, p, normalize, reduction):
    students, teachers = _pairs(SMALL_SHAPES)
    _check(students, teachers, backend, p=p, normalize=normalize, weights=[0.5, 2.0, 1.25],
           reduction=reduction)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p,normalize", OPTIONS)
def test_single_tensor_and_module(backend, p, normalize):
    (s,), (t,) = _pairs([(3, 4, 5, 6)])
    loss = fastkd.feature_regression_loss(s, t, p=p, normalize=normalize, backend=backend)
    module = fastkd.nn.FeatureRegressionLoss(p=p, normalize=normalize, backend=backend)
    assert torch.equal(module(s, t), loss)
    assert torch.equal(module([s], (t,)), loss)
    ref, _ = _reference([s], [t], p=p, normalize=normalize)
    torch.testing.assert_close(loss.double(), ref, rtol=TOL[torch.float32], atol=0)


def test_module_repr_and_arguments():
    m = fastkd.nn.FeatureRegressionLoss(p=1, normalize=True, weights=[500.0, 500.0])
    assert repr(m) == "FeatureRegressionLoss(p=1, normalize=True, weights=[500.0, 500.0])"
    with pytest.raises(ValueError, match="p must be 1"):
        fastkd.nn.FeatureRegressionLoss(p=3)
    with pytest.raises(ValueError, match="weights\\[0\\] must be >= 0"):
        fastkd.nn.FeatureRegressionLoss(weights=[-1.0])
    with pytest.raises(ValueError, match="reduction must be one of"):
        fastkd.nn.FeatureRegressionLoss(reduction="none")


# ---------------------------------------------------------------------------------------------
# Dtypes and memory formats.

DTYPE_CASES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype,teacher_dtype", DTYPE_CASES)
@pytest.mark.parametrize("p,normalize", [(2, False), (1, True)])
def test_dtypes(backend, dtype, teacher_dtype, p, normalize):
    students, teachers = _pairs([(2, 3, 5, 7), (3, 33)], dtype, teacher_dtype)
    _check(students, teachers, backend, p=p, normalize=normalize, weights=[1.0, 0.25])


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("p,normalize", OPTIONS)
def test_float64(backend, p, normalize):
    students, teachers = _pairs([(2, 3, 4, 5), (3, 17)], torch.float64)
    _check(students, teachers, backend, p=p, normalize=normalize, weights=[1.5, 1.0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p,normalize", OPTIONS)
def test_channels_last(backend, p, normalize):
    students, teachers = _pairs([(2, 6, 3, 5), (3, 4, 1, 1)], memory_format=torch.channels_last)
    assert students[0].stride() != students[0].contiguous().stride()
    _check(students, teachers, backend, p=p, normalize=normalize)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layout_mismatch_and_strided_views(backend):
    # Student channels_last, teacher NCHW (copied into the student's layout); a student that is a
    # slice along a non-leading dim (copied once); a view at an odd storage offset (no copy).
    s_cl = _feats((2, 6, 3, 5), memory_format=torch.channels_last).requires_grad_()
    t_nchw = _feats((2, 6, 3, 5), seed=1)
    base = _feats((3, 12), seed=2).requires_grad_()
    t_slice = _feats((3, 5), seed=3)
    offset_base = _feats((1 + 4 * 9,), seed=4)
    s_offset = offset_base[1:].view(4, 9).detach().requires_grad_()
    t_offset = _feats((1 + 4 * 9,), seed=5)[1:].view(4, 9)
    for p, normalize in OPTIONS:
        loss = fastkd.feature_regression_loss(
            [s_cl, base[:, 2:7], s_offset], [t_nchw, t_slice, t_offset], p=p,
            normalize=normalize, backend=backend,
        )
        loss.backward()
        assert s_cl.grad.stride() == s_cl.stride()
        ref_loss, ref_grads = _reference(
            [s_cl, base[:, 2:7].detach(), s_offset], [t_nchw, t_slice, t_offset], p=p,
            normalize=normalize,
        )
        torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=0)
        torch.testing.assert_close(s_cl.grad.double(), ref_grads[0], rtol=2e-5, atol=1e-9)
        torch.testing.assert_close(base.grad[:, 2:7].double(), ref_grads[1], rtol=2e-5, atol=1e-9)
        torch.testing.assert_close(s_offset.grad.double(), ref_grads[2], rtol=2e-5, atol=1e-9)
        assert torch.all(base.grad[:, :2] == 0) and torch.all(base.grad[:, 7:] == 0)
        for x in (s_cl, base, s_offset):
            x.grad = None


# ---------------------------------------------------------------------------------------------
# Shapes: tiny, odd, token features, several samples longer than one kernel block, ResNet stages.

CPU_SHAPES = [
    [(1, 1, 1, 1)],
    [(1, 1)],
    [(3, 5, 7, 11)],
    [(4, 768)],
    [(2, 197, 24)],
    [(2, 20001)],  # samples longer than one chunk of the CPU kernel / block of the Triton one
    [(1, 3, 1, 1), (5, 2, 3, 3), (2, 7), (3, 2, 9), (1, 1, 1, 3)],
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shapes", CPU_SHAPES, ids=lambda s: "+".join(map(str, s)))
@pytest.mark.parametrize("p,normalize", OPTIONS)
def test_shapes(backend, shapes, p, normalize):
    students, teachers = _pairs(shapes)
    weights = [0.5 + i for i in range(len(shapes))]
    _check(students, teachers, backend, p=p, normalize=normalize, weights=weights)


RESNET18_STAGES = [(64, 64, 56, 56), (64, 128, 28, 28), (64, 256, 14, 14), (64, 512, 7, 7)]


# The float64 reference takes seconds at these sizes: two option sets (MSE on NCHW, the FEED loss
# on channels_last); the others run on every small shape above.
@pytest.mark.parametrize(
    "p,normalize,memory_format",
    [(2, False, torch.contiguous_format), (1, True, torch.channels_last)],
)
def test_resnet_stages_cpu(p, normalize, memory_format):
    students, teachers = _pairs(RESNET18_STAGES, memory_format=memory_format)
    _check(students, teachers, "cpu", p=p, normalize=normalize, weights=[1.0, 0.5, 0.25, 2.0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 10])
def test_lists_of_pairs(backend, count):
    # 10 pairs take two launches of the grouped kernels (at most 8 pairs each); mixed dtypes take
    # one launch per (student, teacher) dtype group.
    shapes = [(1 + i % 3, 2 + i, 3) for i in range(count)]
    students, teachers = _pairs(shapes, seed=count)
    weights = [0.1 * (i + 1) for i in range(count)]
    _check(students, teachers, backend, p=1, normalize=True, weights=weights)
    students, teachers = _pairs(shapes, seed=count)
    teachers = [t.to(torch.bfloat16) if i % 2 else t for i, t in enumerate(teachers)]
    _check(students, teachers, backend, p=2, normalize=False, weights=weights)


@given(
    shape=st.lists(st.integers(1, 9), min_size=2, max_size=4),
    p=st.sampled_from([1, 2]),
    normalize=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_property_cpu(shape, p, normalize, scale, dtype, seed):
    students, teachers = _pairs([tuple(shape)], dtype, scale=scale, seed=seed)
    _check(students, teachers, "cpu", p=p, normalize=normalize)


@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_cpu_capability_variants(capability):
    # Every compiled variant of the CPU kernel that this CPU can run.
    skip_unless_cpu_runs(capability)
    script = textwrap.dedent(
        """
        import torch, fastkd
        from fastkd.reference import feature_regression_loss_ref as ref
        g = torch.Generator().manual_seed(0)
        for p, normalize in [(1, False), (2, False), (1, True), (2, True)]:
            for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                s = torch.randn(3, 5, 7, 9, generator=g).to(dtype).requires_grad_()
                t = torch.randn(3, 5, 7, 9, generator=g).to(dtype)
                loss = fastkd.feature_regression_loss(s, t, p=p, normalize=normalize,
                                                      backend="cpu")
                loss.backward()
                s64 = s.detach().double().requires_grad_()
                r = ref(s64, t.double(), p=p, normalize=normalize)
                r.backward()
                tol = {torch.float64: 1e-10, torch.float32: 2e-5}.get(dtype, 1e-2)
                assert abs(loss.item() - r.item()) <= tol * abs(r.item()), (p, normalize, dtype)
                err = (s.grad.double() - s64.grad).abs().max().item()
                assert err <= tol * s64.grad.abs().max().item(), (p, normalize, dtype, err)
        print(torch.backends.cpu.get_cpu_capability())
        """
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == capability.upper()


# ---------------------------------------------------------------------------------------------
# Autograd: gradcheck, grad_output, no gradient when none is needed.


@pytest.mark.parametrize("p,normalize", OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradcheck(p, normalize, reduction):
    students, teachers = _pairs([(2, 3, 2, 2), (3, 5)], torch.float64)

    def f(a, b):
        return fastkd.feature_regression_loss(
            [a, b], teachers, p=p, normalize=normalize, weights=[0.7, 1.3], reduction=reduction,
            backend="cpu",
        )

    assert torch.autograd.gradcheck(f, tuple(students))


def test_gradcheck_below_eps():
    # A sample whose norm is below eps: the normalisation is the linear map a / eps.
    # Its gradient is about 1e11, so the finite-difference step is tiny and atol is loose in
    # absolute terms but about 1e-14 relative.
    s = (torch.randn(2, 6, dtype=torch.float64) * 1e-14).requires_grad_()
    t = torch.randn(2, 6, dtype=torch.float64)

    def f(a):
        return fastkd.feature_regression_loss(a, t, p=2, normalize=True, backend="cpu")

    assert torch.autograd.gradcheck(f, (s,), eps=1e-17, atol=1e-3, rtol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p,normalize", OPTIONS)
@pytest.mark.parametrize("grad_output", [1.0, 3.5, -0.25, 0.0])
def test_grad_output(backend, p, normalize, grad_output):
    students, teachers = _pairs([(2, 3, 4, 4), (2, 9)])
    _check(students, teachers, backend, grad_output, p=p, normalize=normalize, weights=[1.0, 2.0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_loss_used_twice(backend):
    (s,), (t,) = _pairs([(2, 3, 4, 4)])
    loss = fastkd.feature_regression_loss(s, t, p=1, normalize=True, backend=backend)
    (2 * loss + loss).backward()
    _, (ref,) = _reference([s], [t], 3.0, p=1, normalize=True)
    torch.testing.assert_close(s.grad.double(), ref, rtol=2e-5, atol=1e-9)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        # Only the forward op's arguments are kept: holding a gradient would make autograd copy
        # it instead of handing it to .grad.
        self.calls.append((name, args if "feature_regression_fwd" in name else None))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_no_gradient_when_not_needed(backend):
    if backend not in CPU_BACKENDS:
        pytest.skip("Triton does not run here")
    s, t = _feats((2, 3, 4)), _feats((2, 3, 4), seed=1)
    s_req = s.clone().requires_grad_()

    def flags(students, teachers):
        with _RecordOps() as rec:
            fastkd.feature_regression_loss(students, teachers, backend=backend)
        calls = [args for name, args in rec.calls if "feature_regression_fwd" in name]
        assert len(calls) == 1
        return list(calls[0][-1])

    assert flags(s, t) == [False]
    with torch.no_grad():
        assert flags(s_req, t) == [False]
    assert flags([s_req, s], [t, t]) == [True, False]
    loss = fastkd.feature_regression_loss(s, t, backend=backend)
    assert loss.grad_fn is None and not loss.requires_grad
    op = torch.ops.fastkd.feature_regression_fwd
    _, grads = op([s], [t], [1.0], 2, False, True, [False])
    assert grads[0].numel() == 0


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_backward_only_scales(backend):
    # The backward is the grouped scale of the saved gradients and nothing else: no zero-filled
    # gradient for the op's unused outputs, no copy, no multiply when grad_output is 1.
    if backend not in CPU_BACKENDS:
        pytest.skip("Triton does not run here")
    students, teachers = _pairs([(2, 3, 4, 4), (2, 9)])
    for factor in (1.0, 2.0):
        loss = fastkd.feature_regression_loss(students, teachers, p=1, normalize=True,
                                              backend=backend)
        with _RecordOps() as rec:
            (loss * factor).backward()
        names = [name for name, _ in rec.calls]
        assert [n for n in names if "scale_grads" in n] == [
            "fastkd.scale_grads_" if backend == "cpu" else "fastkd.scale_grads_triton_"
        ]
        assert not any(n.startswith(("aten.zeros", "aten.fill", "aten.copy", "aten.clone"))
                       for n in names), names
        for s in students:
            s.grad = None


def test_second_backward_after_a_rescale_is_refused():
    # The backward rescales the saved gradients in place; a graph run backward again must not
    # hand out a gradient scaled twice. With grad_output exactly 1 nothing is written, so a second
    # backward is legal and accumulates the same gradient again.
    (s,), (t,) = _pairs([(2, 3, 4)])
    loss = fastkd.feature_regression_loss(s, t, backend="cpu")
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * first)
    s.grad = None
    loss = fastkd.feature_regression_loss(s, t, backend="cpu") * 3.0
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_mixed_requires_grad_backward():
    (a, b), (ta, tb) = _pairs([(2, 3), (2, 4)])
    b = b.detach()
    loss = fastkd.feature_regression_loss([a, b], [ta, tb], p=1, normalize=True, backend="cpu")
    loss.backward()
    _, (ref, _) = _reference([a, b], [ta, tb], p=1, normalize=True)
    torch.testing.assert_close(a.grad.double(), ref, rtol=2e-5, atol=1e-9)
    assert b.grad is None


def test_teacher_never_differentiated():
    (s,), (t,) = _pairs([(2, 3, 4)])
    t.requires_grad_()
    fastkd.feature_regression_loss(s, t, backend="cpu").backward()
    assert t.grad is None and s.grad is not None


# ---------------------------------------------------------------------------------------------
# opcheck, torch.compile.


# The ops are pure functions of their inputs (fastkd.feature_regression_loss differentiates them
# with an autograd.Function, covered by the gradcheck and torch.compile tests), so opcheck runs
# every test on the inputs they are called with: students that do not require grad.
def _op_samples(dtype=torch.float32):
    (a, b), (ta, tb) = _pairs([(2, 3, 4, 5), (3, 10)], dtype)
    (cl,), (tcl,) = _pairs([(2, 4, 3, 3)], dtype, memory_format=torch.channels_last)
    a, b, cl = a.detach(), b.detach(), cl.detach()
    samples = []
    for p, normalize in OPTIONS:
        samples.append(([a, b], [ta, tb], [1.0, 0.5], p, normalize, True, [True, True]))
    samples.append(([a, b], [ta, tb], [1.0, 0.5], 1, True, False, [False, True]))
    samples.append(([cl], [tcl], [2.0], 2, True, True, [True]))
    samples.append(([a], [ta], [1.0], 2, False, True, [False]))
    return samples


# Under TRITON_INTERPRET=1 the AOT tests run the kernels on functional tensors without data
# pointers (tests/test_kd_loss_ops.py pins that reason): only the eager and fake-tensor tests.
INTERPRETER_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_opcheck_cpu():
    for args in _op_samples():
        torch.library.opcheck(torch.ops.fastkd.feature_regression_fwd, args)
    g = [torch.randn(2, 3), torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)]
    for go in (torch.tensor(2.0), torch.tensor(1.0), torch.tensor(0.5, dtype=torch.float64)):
        torch.library.opcheck(torch.ops.fastkd.scale_grads_, (g, go))


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton does not run here")
def test_opcheck_triton_interpreter():
    for args in _op_samples():
        torch.library.opcheck(torch.ops.fastkd.feature_regression_fwd_triton, args,
                              test_utils=INTERPRETER_UTILS)
    g = [torch.randn(2, 3), torch.randn(5000)]
    torch.library.opcheck(torch.ops.fastkd.scale_grads_triton_, (g, torch.tensor(2.0)),
                          test_utils=INTERPRETER_UTILS)


def test_scale_grads_ops():
    for op in [torch.ops.fastkd.scale_grads_] + (
        [torch.ops.fastkd.scale_grads_triton_] if "triton" in CPU_BACKENDS else []
    ):
        g = [
            torch.randn(3, 5),
            torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last),
            torch.randn(9000).to(torch.bfloat16),
        ]
        want = [x * 2.5 for x in g]
        op(g, torch.tensor(2.5))
        for x, w in zip(g, want, strict=True):
            torch.testing.assert_close(x, w)
        before = [x.clone() for x in g]
        op(g, torch.tensor(1.0))
        for x, b in zip(g, before, strict=True):
            assert torch.equal(x, b)


@pytest.mark.parametrize("p,normalize", [(2, False), (1, True)])
def test_compile_parity(p, normalize):
    torch._dynamo.reset()
    students, teachers = _pairs(
        [(2, 4, 3, 3), (3, 8)], memory_format=torch.channels_last, seed=7
    )

    def step(ss, ts):
        loss = fastkd.feature_regression_loss(ss, ts, p=p, normalize=normalize,
                                              weights=[1.0, 0.5], backend="cpu")
        return loss * 2.0

    compiled = torch.compile(step, fullgraph=True)
    eager = step(students, teachers)
    eager.backward()
    eager_grads = [s.grad.clone() for s in students]
    for s in students:
        s.grad = None
    out = compiled(students, teachers)
    out.backward()
    assert torch.equal(out, eager)
    for s, g in zip(students, eager_grads, strict=True):
        assert torch.equal(s.grad, g)
        assert s.grad.stride() == s.stride()


# ---------------------------------------------------------------------------------------------
# Determinism, extreme values.


def _run(students, teachers, backend, **kw):
    for s in students:
        s.grad = None
    loss = fastkd.feature_regression_loss(students, teachers, backend=backend, **kw)
    loss.backward()
    return loss.detach().clone(), [s.grad.clone() for s in students]


def _assert_bitwise(x, y):
    (la, ga), (lb, gb) = x, y
    assert torch.equal(la, lb)
    for a, b in zip(ga, gb, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p,normalize", OPTIONS)
def test_deterministic(backend, p, normalize):
    students, teachers = _pairs([(3, 4, 50, 50), (5, 700)], seed=3)
    first = _run(students, teachers, backend, p=p, normalize=normalize)
    for _ in range(2):
        _assert_bitwise(first, _run(students, teachers, backend, p=p, normalize=normalize))


@pytest.mark.parametrize("p,normalize", OPTIONS)
def test_deterministic_across_thread_counts(p, normalize):
    # 7 samples, some longer than a chunk: one thread sweeps each sample whole, two threads split
    # every sweep over chunks (fewer than 4 samples per thread; csrc/cpu/feature_regression.cpp);
    # both must give the same bits, as must the flat chunking without normalisation.
    students, teachers = _pairs([(5, 40000), (2, 3, 70, 70)], seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(students, teachers, "cpu", p=p, normalize=normalize)
        torch.set_num_threads(2)
        two = _run(students, teachers, "cpu", p=p, normalize=normalize)
    finally:
        torch.set_num_threads(threads)
    _assert_bitwise(one, two)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p,normalize", OPTIONS)
def test_large_values(backend, p, normalize):
    students, teachers = _pairs([(2, 3, 8, 8), (3, 50)], scale=1e4)
    loss = _check(students, teachers, backend, p=p, normalize=normalize)
    assert math.isfinite(loss.item())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("p", [1, 2])
def test_all_zero_samples_stay_finite(backend, dtype, p):
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("float64 runs on the CPU backend only")
    if dtype == torch.float16 and backend == "torch":
        pytest.skip("the plain-PyTorch backend keeps eager semantics: the float16 gradient of an "
                    "all-zero sample, about c / eps, overflows to inf there")
    # Sample 0 of the student, sample 1 of the teacher, sample 2 of both are all zero.
    s = _feats((4, 3, 4, 4), dtype)
    t = _feats((4, 3, 4, 4), dtype, seed=1)
    with torch.no_grad():
        s[0] = 0
        s[2] = 0
        t[1] = 0
        t[2] = 0
    s.requires_grad_()
    loss = fastkd.feature_regression_loss(s, t, p=p, normalize=True, backend=backend)
    loss.backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()
    assert torch.all(s.grad[2] == 0), "both samples zero: no difference, no gradient"
    if dtype in (torch.float32, torch.float64):
        ref_loss, (ref,) = _reference([s], [t], p=p, normalize=True)
        torch.testing.assert_close(loss.double(), ref_loss, rtol=TOL[dtype], atol=0)
        # The below-eps sample's gradient is g / eps, about 1e10 here; compare relative to it.
        torch.testing.assert_close(s.grad.double(), ref, rtol=TOL[dtype],
                                   atol=TOL[dtype] * ref.abs().max().item())
    if dtype == torch.float16:
        assert s.grad.abs().max().item() == 65504.0, "float16 saturates instead of overflowing"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_equal_inputs_p1_zero_gradient(backend):
    (s,), (t,) = _pairs([(3, 2, 5, 5)])
    t = s.detach().clone()
    for normalize in (False, True):
        s.grad = None
        loss = fastkd.feature_regression_loss(s, t, p=1, normalize=normalize, backend=backend)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.all(s.grad == 0), "sign(0) = 0, as torch's abs backward"


# ---------------------------------------------------------------------------------------------
# Bad input.

_S = torch.randn(2, 3, 4)
_T = torch.randn(2, 3, 4)

BAD = [
    (([_S], [torch.randn(2, 3, 5)]), {}, ValueError, "teacher_feats must have the shape"),
    (([_S, _S], [_T, torch.randn(2, 3)]), {}, ValueError,
     r"teacher_feats\[1\] must have the shape of student_feats\[1\]"),
    (([_S, _S], [_T]), {}, ValueError, "one teacher tensor per student tensor"),
    (([], []), {}, ValueError, "student_feats must not be an empty list"),
    (([_S], []), {}, ValueError, "teacher_feats must not be an empty list"),
    ((torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3)), {}, TypeError,
     "student_feats must be float32, bfloat16, float16 or float64, got torch.int64"),
    ((torch.ones(2, 3), torch.ones(2, 3, dtype=torch.int32)), {}, TypeError,
     "teacher_feats must be float32"),
    ((torch.randn(5), torch.randn(5)), {}, ValueError, "student_feats must be at least 2-D"),
    ((torch.randn(0, 3), torch.randn(0, 3)), {}, ValueError, "student_feats must not be empty"),
    (("x", _T), {}, TypeError, "student_feats must be a tensor or a list/tuple of tensors"),
    (([_S, "x"], [_T, _T]), {}, TypeError, r"student_feats\[1\] must be a torch.Tensor"),
    ((_S, _T.double()), {}, TypeError, "float64 features must be float64"),
    ((_S, _T), {"weights": [-1.0]}, ValueError, r"weights\[0\] must be >= 0"),
    ((_S, _T), {"weights": [math.inf]}, ValueError, r"weights\[0\] must be finite"),
    ((_S, _T), {"weights": [math.nan]}, ValueError, r"weights\[0\] must be finite"),
    ((_S, _T), {"weights": [1.0, 2.0]}, ValueError, "weights must hold 1 values"),
    ((_S, _T), {"weights": 1.0}, TypeError, "weights must be a list or tuple"),
    ((_S, _T), {"p": 3}, ValueError, "p must be 1 .* or 2 .*, got 3"),
    ((_S, _T), {"p": 1.5}, ValueError, "p must be 1 .* or 2 .*, got 1.5"),
    ((_S, _T), {"p": 0}, ValueError, "p must be 1"),
    ((_S, _T), {"p": True}, TypeError, "p must be 1 or 2, got bool"),
    ((_S, _T), {"p": "2"}, TypeError, "p must be 1 or 2, got str"),
    ((_S, _T), {"normalize": 1}, TypeError, "normalize must be a bool"),
    ((_S, _T), {"reduction": "none"}, ValueError, "reduction must be one of 'mean', 'sum'"),
    ((_S, _T), {"reduction": "batchmean"}, ValueError, "reduction must be one of"),
    ((_S, _T), {"backend": "gpu"}, ValueError, "backend must be one of"),
    ((_S, _T), {"backend": "cuda"}, ValueError, "backend='cuda' cannot run these inputs"),
]


@pytest.mark.parametrize("args,kwargs,exc,match", BAD, ids=[b[3][:40] for b in BAD])
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastkd.feature_regression_loss(*args, **kwargs)


def test_bad_op_input():
    op = torch.ops.fastkd.feature_regression_fwd
    s, t = torch.randn(3, 8), torch.randn(3, 8)
    with pytest.raises(RuntimeError, match="dense with each sample contiguous"):
        op([torch.randn(8, 3).t()], [t], [1.0], 2, False, True, [False])
    with pytest.raises(RuntimeError, match="p = 1 or 2"):
        op([s], [t], [1.0], 3, False, True, [False])
    with pytest.raises(RuntimeError, match="weights must be finite and >= 0"):
        op([s], [t], [-1.0], 2, False, True, [False])
    with pytest.raises(RuntimeError, match="one weight per pair"):
        op([s], [t], [1.0, 1.0], 2, False, True, [False])
    with pytest.raises(RuntimeError, match="the teacher has shape"):
        op([s], [torch.randn(3, 9)], [1.0], 2, False, True, [False])
    with pytest.raises(RuntimeError, match="at least 2-D"):
        op([torch.randn(4)], [torch.randn(4)], [1.0], 2, False, True, [False])
    with pytest.raises(RuntimeError, match="scalar grad_output"):
        torch.ops.fastkd.scale_grads_([s], torch.ones(3))


# ---------------------------------------------------------------------------------------------
# GPU: CUDA C++ and Triton on CUDA tensors.

GPU_BACKENDS = (
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            CUDA and not fastkd._C.with_cuda, reason="fastkd._C was built without CUDA kernels"
        ),
    ),
    "triton",
)


def _to_cuda(students, teachers):
    return (
        [s.detach().cuda().requires_grad_() for s in students],
        [t.cuda() for t in teachers],
    )


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("p,normalize", OPTIONS)
@pytest.mark.parametrize("dtype,teacher_dtype", DTYPE_CASES)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_gpu_matches_reference(backend, p, normalize, dtype, teacher_dtype, memory_format):
    shapes = [(4, 16, 9, 9), (3, 3, 1, 1), (2, 8, 33, 17)]
    students, teachers = _to_cuda(*_pairs(shapes, dtype, teacher_dtype, memory_format))
    _check(students, teachers, backend, 2.5, p=p, normalize=normalize,
           weights=[1.0, 0.5, 2.0])


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("p,normalize", OPTIONS)
def test_gpu_shapes(backend, p, normalize):
    for shapes in CPU_SHAPES + [RESNET18_STAGES, [(2, 3, 1025, 1025)], [(8, 197, 768)]]:
        students, teachers = _to_cuda(*_pairs(shapes))
        _check(students, teachers, backend, p=p, normalize=normalize)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_unaligned_views_and_layouts(backend):
    # Element-wise fallbacks: storage offsets that break 16-byte alignment, sample lengths that
    # are not multiples of 8; and a teacher in another layout than its student.
    base = torch.randn(1 + 5 * 37, device="cuda")
    s = base[1:].view(5, 37).detach().requires_grad_()
    t = torch.randn(1 + 5 * 37, device="cuda")[1:].view(5, 37)
    cl = torch.randn(4, 8, 5, 5, device="cuda").contiguous(memory_format=torch.channels_last)
    cl.requires_grad_()
    t_nchw = torch.randn(4, 8, 5, 5, device="cuda")
    for p, normalize in OPTIONS:
        for x in (s, cl):
            x.grad = None
        _check([s, cl], [t, t_nchw], backend, p=p, normalize=normalize)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("p,normalize", OPTIONS)
def test_gpu_deterministic_and_zero_samples(backend, p, normalize):
    students, teachers = _to_cuda(*_pairs(RESNET18_STAGES[1:], torch.bfloat16,
                                          memory_format=torch.channels_last))
    with torch.no_grad():
        students[0][0] = 0
        teachers[1][1] = 0
    first = _run(students, teachers, backend, p=p, normalize=normalize)
    assert torch.isfinite(first[0]) and all(torch.isfinite(g).all() for g in first[1])
    for _ in range(3):
        _assert_bitwise(first, _run(students, teachers, backend, p=p, normalize=normalize))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_cuda_graph_capture(backend):
    students, teachers = _to_cuda(*_pairs([(8, 16, 14, 14), (8, 32, 7, 7)]))
    static_go = torch.ones((), device="cuda")

    def step():
        for s in students:
            s.grad = None
        loss = fastkd.feature_regression_loss(students, teachers, p=1, normalize=True,
                                              backend=backend)
        loss.backward(static_go)
        return loss

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()
    static_go.fill_(2.0)
    graph.replay()
    torch.cuda.synchronize()
    ref_loss, ref_grads = _reference(students, teachers, 2.0, p=1, normalize=True)
    torch.testing.assert_close(loss.double().cpu(), ref_loss.cpu(), rtol=2e-5, atol=0)
    for s, ref in zip(students, ref_grads, strict=True):
        torch.testing.assert_close(s.grad.double(), ref, rtol=2e-5,
                                   atol=2e-5 * ref.abs().max().item())


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.skipif(CUDA and not fastkd._C.with_cuda, reason="fastkd._C was built without CUDA")
def test_gpu_opcheck():
    for args in _op_samples():
        cuda_args = tuple(
            [x.cuda() for x in a]
            if isinstance(a, list) and a and isinstance(a[0], torch.Tensor) else a
            for a in args
        )
        torch.library.opcheck(torch.ops.fastkd.feature_regression_fwd, cuda_args)
        torch.library.opcheck(torch.ops.fastkd.feature_regression_fwd_triton, cuda_args)
    g = [torch.randn(2, 3, device="cuda"), torch.randn(9000, device="cuda").half()]
    for op in (torch.ops.fastkd.scale_grads_, torch.ops.fastkd.scale_grads_triton_):
        torch.library.opcheck(op, (g, torch.tensor(2.0, device="cuda")))
