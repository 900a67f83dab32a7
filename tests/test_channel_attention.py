"""fastkd.channel_attention_loss (Channel Distillation) on every backend against the float64
reference: dtypes, memory formats, reductions, shapes, pair lists, autograd, torch.library checks,
torch.compile, determinism, edge values and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CPU_BACKENDS, CUDA
from hypothesis import given
from hypothesis import strategies as st

import fastkd
from fastkd.reference import channel_attention_loss_ref

CL = torch.channels_last
FUSED_CPU = tuple(b for b in CPU_BACKENDS if b != "torch")
REDUCED = (torch.bfloat16, torch.float16)
# Loss and gradient tolerances (rtol, atol relative to the largest gradient entry) per student
# dtype. The loss accumulates in float32 from the same rounded inputs as the reference, so it is
# tight for every dtype; the gradient is rounded once to the student's dtype.
LOSS_RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}
GRAD_RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def feature_map(shape, dtype=torch.float32, fmt="nchw", device="cpu", seed=0, scale=1.0):
    """A [B, C, H, W] map with a per-channel offset (so channel means differ), in `fmt`:
    "nchw", "cl" (channels_last), "crop" (an H/W crop: pixels not evenly spaced), "cslice" (a
    channel slice of a wider map: planes not 16-byte aligned)."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = shape

    # float64 only where the map is float64: the ResNet-stage maps are large.
    gen_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def values(size):
        x = torch.randn(size, generator=g, dtype=gen_dtype)
        x = x + torch.randn(size[0], size[1], 1, 1, generator=g, dtype=gen_dtype)
        return (scale * x).to(dtype).to(device)

    if fmt == "nchw":
        return values(shape)
    if fmt == "cl":
        return values(shape).contiguous(memory_format=CL)
    if fmt == "crop":
        return values((b, c, h + 2, w + 3))[:, :, 1 : h + 1, 2 : w + 2]
    if fmt == "cslice":
        return values((b, c + 1, h, w))[:, 1:]
    raise AssertionError(fmt)


def leaves(maps):
    """Leaves requiring grad that share each map's memory and strides (crops stay crops)."""
    return [m.detach().requires_grad_() for m in maps]


def reference(students, teachers, weights=None, reduction="mean", grad_output=1.0):
    """float64 loss and student gradients."""
    s64 = [s.detach().double().requires_grad_() for s in students]
    t64 = [t.detach().double() for t in teachers]
    loss = channel_attention_loss_ref(s64, t64, weights=weights, reduction=reduction)
    grads = torch.autograd.grad(loss, s64, grad_outputs=torch.tensor(grad_output, dtype=loss.dtype))
    return loss.detach(), grads


def run(students, teachers, backend, weights=None, reduction="mean", grad_output=1.0):
    xs = leaves(students)
    loss = fastkd.channel_attention_loss(
        xs, teachers, weights=weights, reduction=reduction, backend=backend
    )
    grads = torch.autograd.grad(
        loss, xs, grad_outputs=torch.tensor(grad_output, dtype=loss.dtype, device=loss.device)
    )
    return loss.detach(), grads, xs


def assert_close(students, teachers, backend, weights=None, reduction="mean", grad_output=1.0):
    loss, grads, _ = run(students, teachers, backend, weights, reduction, grad_output)
    ref_loss, ref_grads = reference(students, teachers, weights, reduction, grad_output)
    dtype = students[0].dtype
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == expected and loss.dim() == 0
    torch.testing.assert_close(
        loss.double().cpu(), ref_loss, rtol=LOSS_RTOL[dtype], atol=1e-30 + 1e-9 * abs(ref_loss)
    )
    for g, r, s in zip(grads, ref_grads, students, strict=True):
        assert g.dtype == s.dtype and g.shape == s.shape
        scale = r.abs().max().item()
        torch.testing.assert_close(
            g.double().cpu(), r, rtol=GRAD_RTOL[s.dtype], atol=GRAD_RTOL[s.dtype] * scale + 1e-30
        )
    return loss, grads


def dtypes_for(backend):
    return (torch.float32, *REDUCED) + ((torch.float64,) if backend in ("cpu", "torch") else ())


PARITY = [
    (backend, dtype, fmt)
    for backend in CPU_BACKENDS
    for dtype in dtypes_for(backend)
    for fmt in ("nchw", "cl", "mixed", "crop", "cslice")
]


@pytest.mark.parametrize("backend,dtype,fmt", PARITY)
def test_parity(backend, dtype, fmt):
    """Two pairs with different spatial sizes (and a teacher dtype that differs for reduced
    students), against float64."""
    s_fmt, t_fmt = ("cl", "nchw") if fmt == "mixed" else (fmt, fmt)
    t_dtype = torch.float32 if dtype in REDUCED else dtype
    students = [
        feature_map((2, 5, 7, 9), dtype, s_fmt, seed=1),
        feature_map((1, 40, 3, 3), dtype, s_fmt, seed=2),
    ]
    teachers = [
        feature_map((2, 5, 4, 3), t_dtype, t_fmt, seed=3),
        feature_map((1, 40, 6, 6), dtype, "cl" if t_fmt == "nchw" else "nchw", seed=4),
    ]
    assert_close(students, teachers, backend, weights=[1.0, 0.75])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduction_and_grad_output(backend, reduction):
    students = [feature_map((3, 6, 5, 5), seed=5), feature_map((3, 9, 2, 4), fmt="cl", seed=6)]
    teachers = [feature_map((3, 6, 3, 3), seed=7), feature_map((3, 9, 4, 2), seed=8)]
    assert_close(students, teachers, backend, weights=[2.0, 0.5], reduction=reduction,
                 grad_output=-3.5)


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_backward_twice(backend):
    """The forward keeps only the per-channel values, so a retained graph can run backward again."""
    s = feature_map((2, 6, 4, 4), seed=130).requires_grad_()
    t = feature_map((2, 6, 2, 2), seed=131)
    loss = fastkd.channel_attention_loss(s, t, backend=backend)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    loss.backward()
    torch.testing.assert_close(s.grad, 2 * first, rtol=0, atol=0)


def test_auto_backend_runs_on_cpu():
    s, t = feature_map((2, 6, 4, 4), seed=132), feature_map((2, 6, 2, 2), seed=133)
    expected = fastkd.channel_attention_loss(s, t, backend="cpu")
    assert torch.equal(fastkd.channel_attention_loss(s, t), expected)


SHAPES = [
    ((1, 1, 1, 1), (1, 1, 1, 1)),
    ((1, 1, 1, 1), (1, 1, 5, 5)),
    ((3, 17, 13, 11), (3, 17, 1, 1)),
    ((2, 1, 33, 31), (2, 1, 8, 8)),
    ((4, 300, 1, 1), (4, 300, 2, 2)),
    ((2, 67, 1, 9), (2, 67, 9, 1)),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "x".join(map(str, s[0])))
@pytest.mark.parametrize("fmt", ["nchw", "cl"])
def test_shapes(backend, shapes, fmt):
    s_shape, t_shape = shapes
    if backend == "triton" and math.prod(s_shape) * 2 > 20000:
        pytest.skip("kept small under the Triton interpreter")
    students = [feature_map(s_shape, fmt=fmt, seed=9)]
    teachers = [feature_map(t_shape, fmt="nchw" if fmt == "cl" else "cl", seed=10)]
    assert_close(students, teachers, backend)


RESNET18 = [(64, 64, 56, 56), (64, 128, 28, 28), (64, 256, 14, 14), (64, 512, 7, 7)]


@pytest.mark.parametrize("fmt", ["nchw", "cl"])
def test_resnet_stages_cpu(fmt):
    """The four ResNet-18 stages at batch 64 in one call, checked against float64 means and the
    closed-form gradient 2 w (w_s - w_t) / (B C H W)."""
    students = [feature_map(s, fmt=fmt, seed=11 + i) for i, s in enumerate(RESNET18)]
    teachers = [feature_map(s, fmt="cl" if fmt == "nchw" else "nchw", seed=21 + i)
                for i, s in enumerate(RESNET18)]
    weights = [1.0, 0.5, 2.0, 1.5]
    loss, grads, _ = run(students, teachers, "cpu", weights)
    expected = 0.0
    for s, t, w, g in zip(students, teachers, weights, grads, strict=True):
        d = s.mean((2, 3), dtype=torch.float64) - t.mean((2, 3), dtype=torch.float64)
        expected += w * d.square().mean().item()
        b, c, h, wd = s.shape
        value = (2 * w * d / (b * c * h * wd)).float()
        torch.testing.assert_close(g[:, :, :1, :1].reshape(b, c), value, rtol=1e-5,
                                   atol=1e-5 * value.abs().max().item())
        # every (h, w) holds the same value
        assert torch.equal(g, g[:, :, :1, :1].expand_as(g))
        assert g.is_contiguous(memory_format=CL if fmt == "cl" else torch.contiguous_format)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pairs", [1, 2, 3, 4, 5])
def test_pair_lists(backend, pairs):
    if backend == "triton" and pairs not in (1, 5):
        pytest.skip("1 and 5 pairs cover one and two Triton launches")
    shapes = [(2, 3, 6, 6), (2, 8, 3, 5), (1, 33, 2, 2), (2, 4, 4, 4), (3, 2, 5, 1)][:pairs]
    students = [feature_map(s, fmt="cl" if i % 2 else "nchw", seed=30 + i)
                for i, s in enumerate(shapes)]
    teachers = [feature_map((b, c, h + 1, w), seed=40 + i)
                for i, (b, c, h, w) in enumerate(shapes)]
    weights = [0.5, 0.0, 2.0, 1.0, 3.0][:pairs]
    assert_close(students, teachers, backend, weights=weights)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_single_tensor_equals_one_element_list(backend):
    s, t = feature_map((2, 6, 4, 4), seed=50), feature_map((2, 6, 2, 2), seed=51)
    a = fastkd.channel_attention_loss(s, t, backend=backend)
    b = fastkd.channel_attention_loss([s], (t,), weights=[1.0], backend=backend)
    assert torch.equal(a, b)


@given(
    b=st.integers(1, 3),
    c=st.integers(1, 40),
    hs=st.integers(1, 9),
    ws=st.integers(1, 9),
    ht=st.integers(1, 9),
    wt=st.integers(1, 9),
    fmt=st.sampled_from(["nchw", "cl", "crop", "cslice"]),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_property_cpu(b, c, hs, ws, ht, wt, fmt, scale):
    students = [feature_map((b, c, hs, ws), fmt=fmt, seed=b * c + hs, scale=scale)]
    teachers = [feature_map((b, c, ht, wt), fmt="cl", seed=ws + wt, scale=scale)]
    assert_close(students, teachers, "cpu", reduction="sum")


def test_gradcheck_cpu_float64():
    students = [
        feature_map((2, 3, 3, 4), torch.float64, "nchw", seed=60).requires_grad_(),
        feature_map((1, 5, 2, 2), torch.float64, "cl", seed=61).requires_grad_(),
    ]
    teachers = [feature_map((2, 3, 2, 2), torch.float64, seed=62),
                feature_map((1, 5, 3, 1), torch.float64, seed=63)]

    def f(a, b):
        return fastkd.channel_attention_loss([a, b], teachers, weights=[1.0, 0.5], backend="cpu")

    assert torch.autograd.gradcheck(f, students)


def _op_args(dtype=torch.float32, requires_grad=False):
    students = [feature_map((2, 5, 4, 3), dtype, "cl", seed=70),
                feature_map((1, 3, 2, 2), dtype, "nchw", seed=71)]
    teachers = [
        feature_map((2, 5, 2, 2), dtype, seed=72),
        feature_map((1, 3, 3, 3), dtype, seed=73),
    ]
    return [s.requires_grad_(requires_grad) for s in students], teachers, [1.0, 0.5], True


def _bwd_args():
    return (
        [torch.randn(2, 5), torch.randn(1, 3)],
        torch.tensor(1.5),
        [2, 5, 4, 3, 1, 3, 2, 2],
        [True, False],
        torch.bfloat16,
    )


def test_opcheck_cpu():
    fwd = torch.ops.fastkd.channel_attention_fwd.default
    torch.library.opcheck(fwd, _op_args(requires_grad=False))
    torch.library.opcheck(fwd, _op_args(torch.float64, requires_grad=False))
    torch.library.opcheck(torch.ops.fastkd.channel_attention_bwd.default, _bwd_args())


# The aot_dispatch tests need real device pointers, which the Triton interpreter does not have.
TRITON_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton runs on the GPU here")
def test_opcheck_triton_interpreter():
    torch.library.opcheck(
        torch.ops.fastkd.channel_attention_fwd_triton.default,
        _op_args(requires_grad=False),
        test_utils=TRITON_OPCHECK,
    )
    torch.library.opcheck(
        torch.ops.fastkd.channel_attention_bwd_triton.default, _bwd_args(),
        test_utils=TRITON_OPCHECK,
    )


def test_compile_fullgraph_cpu():
    students = [feature_map((2, 6, 5, 5), seed=80), feature_map((2, 10, 3, 3), fmt="cl", seed=81)]
    teachers = [feature_map((2, 6, 3, 3), seed=82), feature_map((2, 10, 6, 6), seed=83)]

    def f(ss, ts):
        return 2.0 * fastkd.channel_attention_loss(ss, ts, weights=[1.0, 0.5], backend="cpu")

    compiled = torch.compile(f, fullgraph=True)
    eager_s, comp_s = leaves(students), leaves(students)
    eager = f(eager_s, teachers)
    eager.backward()
    out = compiled(comp_s, teachers)
    out.backward()
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=0)
    for a, b in zip(comp_s, eager_s, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
        assert a.grad.stride() == b.grad.stride()


@pytest.mark.parametrize("backend", FUSED_CPU)
def test_deterministic(backend):
    shapes = [(3, 20, 9, 9), (3, 70, 4, 4)] if backend == "triton" else RESNET18[2:]
    students = [feature_map(s, fmt="cl" if i else "nchw", seed=90 + i)
                for i, s in enumerate(shapes)]
    teachers = [feature_map(s, seed=95 + i) for i, s in enumerate(shapes)]
    # Two threads at least, whatever the machine's core count or OMP_NUM_THREADS: with one, both
    # runs would be single-threaded and nothing would be compared.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        loss1, grads1, _ = run(students, teachers, backend)
        torch.set_num_threads(1)
        loss2, grads2, _ = run(students, teachers, backend)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(loss1, loss2)
    for a, b in zip(grads1, grads2, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_extreme_values(backend):
    s = torch.full((2, 4, 3, 3), 1.0e4)
    s[:, ::2] = -1.0e4
    t = torch.full((2, 4, 5, 5), -1.0e4)
    t[:, 1] = 1.0e4
    loss, grads = assert_close([s], [t], backend)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    # Equal maps give exactly zero.
    zero = fastkd.channel_attention_loss(s, s.clone(), backend=backend)
    assert zero.item() == 0.0


@pytest.mark.parametrize("backend", FUSED_CPU)
@pytest.mark.parametrize("fmt", ["nchw", "cl", "crop", "cslice"])
def test_gradient_layout(backend, fmt):
    """The gradient comes back in the student's memory format (channels_last stays
    channels_last), in the student's dtype."""
    s = leaves([feature_map((2, 6, 4, 5), torch.bfloat16, fmt, seed=100)])[0]
    t = feature_map((2, 6, 3, 3), seed=101)
    (g,) = torch.autograd.grad(fastkd.channel_attention_loss(s, t, backend=backend), s)
    assert g.dtype == torch.bfloat16
    if fmt == "cl":
        assert g.is_contiguous(memory_format=CL) and not g.is_contiguous()
    else:
        assert g.is_contiguous()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_gradient_without_requires_grad(backend):
    s1, s2 = feature_map((2, 3, 4, 4), seed=110), feature_map((2, 5, 2, 2), seed=111)
    t1 = feature_map((2, 3, 2, 2), seed=112).requires_grad_()
    t2 = feature_map((2, 5, 3, 3), seed=113)
    loss = fastkd.channel_attention_loss([s1, s2], [t1, t2], backend=backend)
    assert not loss.requires_grad  # although the teacher t1 requires grad
    # Only the student that asks gets a gradient; the teacher never does.
    s2.requires_grad_()
    loss = fastkd.channel_attention_loss([s1, s2], [t1, t2], backend=backend)
    loss.backward()
    assert s1.grad is None and t1.grad is None
    _, (ref,) = reference([s2], [t2], weights=[1.0])
    torch.testing.assert_close(s2.grad.double(), ref, rtol=2e-5, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_module(backend):
    students = [feature_map((2, 4, 3, 3), seed=120), feature_map((2, 6, 2, 2), fmt="cl", seed=121)]
    teachers = [feature_map((2, 4, 2, 2), seed=122), feature_map((2, 6, 4, 4), seed=123)]
    crit = fastkd.nn.ChannelAttentionLoss(weights=[1.0, 0.25], reduction="sum", backend=backend)
    expected = channel_attention_loss_ref(students, teachers, weights=[1.0, 0.25], reduction="sum")
    torch.testing.assert_close(crit(students, teachers), expected, rtol=2e-5, atol=0)
    assert "reduction='sum'" in repr(crit)


def _bad(**overrides):
    args = {
        "student_feats": [torch.randn(2, 4, 3, 3), torch.randn(2, 8, 2, 2)],
        "teacher_feats": [torch.randn(2, 4, 5, 5), torch.randn(2, 8, 2, 2)],
        "weights": None,
        "reduction": "mean",
        "backend": "cpu",
    }
    args.update(overrides)
    return args


BAD_INPUTS = [
    ("channel mismatch", _bad(teacher_feats=[torch.randn(2, 5, 3, 3), torch.randn(2, 8, 2, 2)]),
     ValueError, r"teacher_feats\[0\] has 5 channels but student_feats\[0\] has 4"),
    ("batch mismatch", _bad(teacher_feats=[torch.randn(2, 4, 3, 3), torch.randn(3, 8, 2, 2)]),
     ValueError, r"teacher_feats\[1\] has batch size 3 but student_feats\[1\] has 2"),
    ("list length", _bad(teacher_feats=[torch.randn(2, 4, 3, 3)]),
     ValueError, r"same number of maps .* got 2 and 1"),
    ("empty list", _bad(student_feats=[]), ValueError, r"student_feats must not be an empty list"),
    ("empty teacher list", _bad(teacher_feats=()), ValueError,
     r"teacher_feats must not be an empty list"),
    ("not a tensor", _bad(student_feats="maps"), TypeError, r"student_feats must be a tensor"),
    ("integer student", _bad(student_feats=[torch.ones(2, 4, 3, 3, dtype=torch.int64),
                                            torch.randn(2, 8, 2, 2)]),
     TypeError, r"student_feats\[0\] must be float32, bfloat16, float16 or float64, got "
     r"torch.int64"),
    ("integer teacher", _bad(student_feats=torch.randn(2, 4, 3, 3),
                             teacher_feats=torch.ones(2, 4, 3, 3, dtype=torch.int32)),
     TypeError, r"teacher_feats must be float32, bfloat16, float16 or float64, got torch.int32"),
    ("3-D map", _bad(student_feats=[torch.randn(2, 4, 9), torch.randn(2, 8, 2, 2)]),
     ValueError, r"student_feats\[0\] must be a 4-D \[B, C, H, W\] feature map, got 3-D"),
    ("5-D map", _bad(teacher_feats=[torch.randn(2, 4, 5, 5), torch.randn(2, 8, 2, 2, 1)]),
     ValueError, r"teacher_feats\[1\] must be a 4-D .* got 5-D"),
    ("empty map", _bad(student_feats=[torch.randn(2, 4, 0, 3), torch.randn(2, 8, 2, 2)]),
     ValueError, r"student_feats\[0\] must not be empty"),
    ("negative weight", _bad(weights=[1.0, -0.5]), ValueError, r"weights\[1\] must be >= 0.0"),
    ("nan weight", _bad(weights=[float("nan"), 1.0]), ValueError, r"weights\[0\] must be finite"),
    ("inf weight", _bad(weights=[1.0, float("inf")]), ValueError, r"weights\[1\] must be finite"),
    ("weights length", _bad(weights=[1.0]), ValueError, r"weights must hold 2 values"),
    ("weight type", _bad(weights=[1.0, "x"]), TypeError, r"weights\[1\] must be a real number"),
    ("reduction", _bad(reduction="batchmean"), ValueError,
     r"reduction must be one of 'mean', 'sum', got 'batchmean'"),
    ("backend", _bad(backend="fast"), ValueError, r"backend must be one of .* got 'fast'"),
    ("float64 mixed", _bad(student_feats=[torch.randn(2, 4, 3, 3, dtype=torch.float64),
                                          torch.randn(2, 8, 2, 2, dtype=torch.float64)]),
     TypeError, r"float64 feature maps must be float64 for every"),
]


@pytest.mark.parametrize("args,exc,match", [b[1:] for b in BAD_INPUTS],
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        fastkd.channel_attention_loss(**args)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match=r"weights\[0\] must be >= 0.0"):
        fastkd.nn.ChannelAttentionLoss(weights=[-1.0])
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        fastkd.nn.ChannelAttentionLoss(reduction="none")
    with pytest.raises(ValueError, match=r"backend must be one of"):
        fastkd.nn.ChannelAttentionLoss(backend="gpu")
    crit = fastkd.nn.ChannelAttentionLoss(weights=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"weights must hold 1 values"):
        crit(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3))


def test_float64_rejected_by_gpu_backends():
    s = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"triton: float64 runs on the CPU backend only|"
                                         r"triton: tensors are on cpu"):
        fastkd.channel_attention_loss(s, s, backend="triton")


def test_op_rejects_bad_arguments():
    """Direct calls of the C++ op are checked too (never a crash or an out-of-bounds read)."""
    s, t = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 5, 5)
    op = torch.ops.fastkd.channel_attention_fwd
    with pytest.raises(RuntimeError, match="share batch size and channel count"):
        op([s], [torch.randn(2, 3, 3, 3)], [1.0], True)
    with pytest.raises(RuntimeError, match="one weight per pair"):
        op([s], [t], [1.0, 2.0], True)
    with pytest.raises(RuntimeError, match="must be 4-D"):
        op([s], [t[0]], [1.0], True)
    bwd = torch.ops.fastkd.channel_attention_bwd
    with pytest.raises(RuntimeError, match=r"must be a contiguous \[2, 4\] tensor"):
        bwd([torch.randn(4, 2)], torch.tensor(1.0), [2, 4, 3, 3], [False], torch.float32)
    with pytest.raises(RuntimeError, match="4 sizes and one channels_last flag per diff"):
        bwd([torch.randn(2, 4)], torch.tensor(1.0), [2, 4, 3], [False], torch.float32)
    with pytest.raises(RuntimeError, match="must be float32 for a BFloat16 gradient"):
        bwd([torch.randn(2, 4).double()], torch.tensor(1.0), [2, 4, 3, 3], [False],
            torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# GPU: the CUDA and Triton backends on CUDA tensors (skipped without a GPU).

GPU_FUSED = (
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            CUDA and not fastkd._C.with_cuda, reason="fastkd._C was built without CUDA kernels"
        ),
    ),
    "triton",
)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("backend", GPU_FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["nchw", "cl", "mixed", "crop", "cslice"])
def test_gpu_parity(backend, dtype, fmt):
    s_fmt, t_fmt = ("cl", "nchw") if fmt == "mixed" else (fmt, fmt)
    shapes = [((4, 64, 56, 56), (4, 64, 28, 28)), ((4, 96, 7, 7), (4, 96, 14, 14)),
              ((3, 63, 5, 3), (3, 63, 1, 1)), ((2, 1, 1, 1), (2, 1, 3, 3)),
              ((2, 2048, 1, 1), (2, 2048, 7, 7))]
    students = [feature_map(s, dtype, s_fmt, "cuda", seed=i) for i, (s, _) in enumerate(shapes)]
    teachers = [feature_map(t, torch.float32, t_fmt, "cuda", seed=10 + i)
                for i, (_, t) in enumerate(shapes)]
    assert_close(students, teachers, backend, weights=[1.0, 0.5, 2.0, 1.0, 0.25], grad_output=1.5)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("backend", GPU_FUSED)
@pytest.mark.parametrize("fmt", ["nchw", "cl"])
def test_gpu_resnet50_stages(backend, fmt):
    shapes = [(32, 256, 56, 56), (32, 512, 28, 28), (32, 1024, 14, 14), (32, 2048, 7, 7)]
    students = [feature_map(s, torch.bfloat16, fmt, "cuda", seed=i) for i, s in enumerate(shapes)]
    teachers = [feature_map(s, torch.bfloat16, fmt, "cuda", seed=9 + i)
                for i, s in enumerate(shapes)]
    assert_close(students, teachers, backend)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_many_pairs_and_layout(backend):
    """More pairs than one launch takes (8 for CUDA, 4 for Triton); gradient layouts."""
    shapes = [(2, 8 * (i + 1), 9 - i % 5, 3 + i % 4) for i in range(11)]
    students = [feature_map(s, fmt="cl" if i % 2 else "nchw", device="cuda", seed=i)
                for i, s in enumerate(shapes)]
    teachers = [feature_map(s, device="cuda", seed=20 + i) for i, s in enumerate(shapes)]
    _, grads = assert_close(students, teachers, backend, weights=[0.5 * i for i in range(11)])
    for i, g in enumerate(grads):
        assert g.is_contiguous(memory_format=CL if i % 2 else torch.contiguous_format)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("backend", GPU_FUSED)
def test_gpu_deterministic_and_graph_capture(backend):
    students = [feature_map(s, torch.bfloat16, fmt, "cuda", seed=i)
                for i, (s, fmt) in enumerate(zip(RESNET18, ["nchw", "cl", "nchw", "cl"],
                                                 strict=True))]
    teachers = [feature_map(s, device="cuda", seed=5 + i) for i, s in enumerate(RESNET18)]
    loss1, grads1, _ = run(students, teachers, backend)
    loss2, grads2, _ = run(students, teachers, backend)
    assert torch.equal(loss1, loss2)
    assert all(torch.equal(a, b) for a, b in zip(grads1, grads2, strict=True))

    xs = leaves(students)
    run(students, teachers, backend)  # warm-up outside the capture (compiles Triton kernels)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        loss = fastkd.channel_attention_loss(xs, teachers, backend=backend)
        grads = torch.autograd.grad(loss, xs)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(loss, loss1)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads1, strict=True))


def test_benchmark_cases(tmp_path):
    """The loss's benchmark cases run through the harness (tiny shapes, CPU) and count bytes as
    documented: students and teachers read once, the students' gradients written once."""
    import json

    from fastkd.__main__ import main
    from fastkd.benchmark import Case, load_loss

    bench = load_loss("channel_attention")
    stages = Case("channel_attention", (2, 4, 7, 7), "bf16", "stages")
    shapes = [(2, 4, 7, 7), (2, 8, 4, 4), (2, 16, 2, 2), (2, 32, 1, 1)]
    student_bytes = 2 * sum(math.prod(s) for s in shapes)
    assert bench.min_bytes(stages, "fwd") == 2 * student_bytes
    assert bench.min_bytes(stages, "fwdbwd") == 3 * student_bytes
    out = tmp_path / "ca.json"
    argv = ["bench", "--loss", "channel_attention", "--device", "cpu", "--quick", "--rep-ms", "2",
            "--warmup-ms", "1", "--threads", "1", "--shapes", "2x4x6x6", "--dtype", "fp32",
            "--peers", "eager", "--json", str(out)]
    assert main(argv) == 0
    ms = json.loads(out.read_text())["measurements"]
    assert {m["variant"] for m in ms} == {"stages", "stages-cl", "map", "map-cl"}
    assert {m["impl"] for m in ms} == {"fastkd", "eager"}
    assert all(m["rel_err"] < 1e-5 for m in ms if not m["derived"])
