"""The kd_loss ops as PyTorch sees them: float64 gradcheck, torch.library.opcheck,
torch.compile(fullgraph=True), the C++ kernel's CPU-capability variants, FASTKD_BACKEND."""

from __future__ import annotations

import pytest
import torch
from conftest import CPU_BACKENDS
from kd_helpers import IGNORE, INTERPRETER_NOISE, _seed, make_inputs  # noqa: F401
from machine import CPU_CAPABILITIES, check_capability_variant, run_python
from torch._inductor.compile_fx import compile_fx
from torch.library import opcheck

import fastkd

pytestmark = INTERPRETER_NOISE

F64 = torch.float64

# --- gradcheck --------------------------------------------------------------------------------

GRADCHECK_CASES = {
    "kd": {"temperature": 2.0},
    "ce_smoothing": {"alpha": 0.3, "temperature": 3.0, "label_smoothing": 0.1},
    "guided_cohort": {"guided": True, "teacher_weights": [0.4, 1.3], "temperature": 1.5,
                      "alpha": 0.8},
    "sum": {"reduction": "sum", "alpha": 0.5},
    "mean": {"reduction": "mean", "temperature": 2.0},
}


def _gradcheck_inputs(teachers: int = 2):
    # [2, 3, 7] logits, read through a slice of a wider tensor (strided rows); one ignored row.
    s, ts, y = make_inputs((2, 3, 7), F64, teachers=teachers, ignore=True, guided_hits=True)
    big = torch.cat([s, torch.randn(2, 3, 5, dtype=F64)], -1).requires_grad_(True)
    return big, ts, y


# The torch backend is plain autograd (and slow to gradcheck): the two richest cases.
GRADCHECK_RUNS = [("cpu", c) for c in GRADCHECK_CASES] + [
    ("torch", "ce_smoothing"), ("torch", "guided_cohort")
]


@pytest.mark.parametrize("backend,case", GRADCHECK_RUNS)
def test_gradcheck(backend, case):
    kw = GRADCHECK_CASES[case]
    big, ts, y = _gradcheck_inputs()
    teachers = ts if "teacher_weights" in kw else ts[0]
    assert torch.autograd.gradcheck(
        lambda x: fastkd.kd_loss(x[..., :7], teachers, y, backend=backend, **kw), (big,)
    )


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_jacobian_of_per_row_losses(backend):
    """reduction="none": gradcheck's second backward over one graph is refused by design (the
    saved gradient is scaled in place), so each Jacobian row comes from a fresh graph, against
    central differences."""
    s, ts, y = make_inputs((5, 6), F64, ignore=True)
    kw = dict(alpha=0.6, temperature=2.0, label_smoothing=0.1, reduction="none", backend=backend)
    rows = []
    for r in range(5):
        x = s.clone().requires_grad_(True)
        fastkd.kd_loss(x, ts[0], y, **kw)[r].backward()
        rows.append(x.grad.reshape(-1))
    analytic = torch.stack(rows)
    h = 1e-6
    numeric = torch.empty_like(analytic)
    for i in range(s.numel()):
        plus, minus = s.clone(), s.clone()
        plus.view(-1)[i] += h
        minus.view(-1)[i] -= h
        diff = fastkd.kd_loss(plus, ts[0], y, **kw) - fastkd.kd_loss(minus, ts[0], y, **kw)
        numeric[:, i] = diff / (2 * h)
    torch.testing.assert_close(analytic, numeric, atol=1e-7, rtol=1e-5)


# --- opcheck ----------------------------------------------------------------------------------

# Each argument set: (student, teachers, labels, kd_row_weights, ce_row_weights, kd_coefs,
# ce_coef, temperature, label_smoothing, ignore_index, per_row, compute_grad, sparse_ids,
# sparse_values, sparse_tails); sparse teachers are tested in test_kd_loss_sparse_op.py.
NO_SPARSE = ([], [], [])


def _op_sets(student_requires_grad: bool) -> dict[str, tuple]:
    s = torch.randn(2, 3, 13, requires_grad=student_requires_grad)
    t1, t2 = torch.randn(2, 3, 13), torch.randn(2, 3, 13).bfloat16()
    y = torch.randint(0, 13, (6,))
    y[4] = IGNORE
    kd_w = torch.rand(2, 6)
    ce_w = torch.rand(6)
    ce_w[4] = 0.0  # the ignored row: the op reads a row's label only when its CE weight != 0
    return {
        "kd": (s, [t1], None, None, None, [0.5], 0.0, 2.0, 0.0, IGNORE, False, True, *NO_SPARSE),
        "labels_row_weights_per_row": (s, [t1, t1 * 2], y, kd_w, ce_w, [0.5, 0.25], 0.3, 2.0,
                                       0.1, IGNORE, True, True, *NO_SPARSE),
        "shared_row_weights_bf16_teacher": (s, [t2], y, ce_w.expand(1, 6), ce_w, [1.0], 0.5,
                                            1.0, 0.0, IGNORE, False, True, *NO_SPARSE),
        "no_grad": (s, [t1], y, None, ce_w, [1.0], 0.5, 1.0, 0.0, IGNORE, False, False,
                    *NO_SPARSE),
    }


FRONT_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")


# The ops are pure functions of their inputs (fastkd.kd_loss differentiates them with an
# autograd.Function, covered by the gradcheck and torch.compile tests), so opcheck runs every test
# on the inputs they are called with: a student that does not require grad.
@pytest.mark.parametrize("name", ["kd", "labels_row_weights_per_row",
                                  "shared_row_weights_bf16_teacher", "no_grad"])
def test_opcheck_kd_loss_fwd(name):
    opcheck(torch.ops.fastkd.kd_loss_fwd.default, _op_sets(False)[name])


@pytest.mark.parametrize("go", ["scalar", "unit_scalar", "per_row", "per_row_f64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_opcheck_scale_grad(dtype, go):
    grad = torch.randn(2, 3, 11).to(dtype)
    grad_output = {
        "scalar": torch.tensor(2.5),
        "unit_scalar": torch.tensor(1.0),
        "per_row": torch.rand(6),
        "per_row_f64": torch.rand(6, dtype=F64),
    }[go]
    opcheck(torch.ops.fastkd.scale_grad_.default, (grad, grad_output))


needs_interpreted_triton = pytest.mark.skipif(
    "triton" not in CPU_BACKENDS, reason="Triton on CPU tensors needs TRITON_INTERPRET=1"
)
# Under TRITON_INTERPRET=1, test_aot_dispatch_* run the kernels on AOTAutograd's functional
# tensors, whose storage has no data pointer for the interpreter ("Attempted to access the data
# pointer on an invalid python storage"), and the CPU-only label check reads label values
# (data-dependent under tracing). On a GPU the kernels trace through wrap_triton; here only the
# tests that run the op eagerly or on fake tensors apply.
TRITON_CPU_UTILS = FRONT_UTILS


@needs_interpreted_triton
@pytest.mark.parametrize("name", ["kd", "labels_row_weights_per_row", "no_grad"])
def test_opcheck_kd_loss_fwd_triton(name):
    opcheck(torch.ops.fastkd.kd_loss_fwd_triton.default, _op_sets(False)[name],
            test_utils=TRITON_CPU_UTILS)


@needs_interpreted_triton
def test_opcheck_kd_loss_fwd_triton_aot_fails_only_for_the_interpreter():
    """Pins the reason TRITON_CPU_UTILS leaves out the AOT tests (see above)."""
    with pytest.raises(Exception, match="data pointer on an invalid python storage"):
        opcheck(torch.ops.fastkd.kd_loss_fwd_triton.default, _op_sets(False)["kd"],
                test_utils="test_aot_dispatch_dynamic")


@needs_interpreted_triton
@pytest.mark.parametrize("go", [torch.tensor(2.5), torch.tensor(1.0), torch.rand(6)],
                         ids=["scalar", "unit_scalar", "per_row"])
def test_opcheck_scale_grad_triton(go):
    opcheck(torch.ops.fastkd.scale_grad_triton_.default, (torch.randn(2, 3, 11), go),
            test_utils=TRITON_CPU_UTILS)


# --- torch.compile ----------------------------------------------------------------------------

COMPILE_CASES = {
    "kd": {},
    "labels_alpha": {"alpha": 0.3, "temperature": 2.0, "label_smoothing": 0.1},
    "guided_cohort": {"guided": True, "temperature": 1.5, "teacher_weights": [0.3, 1.2],
                      "reduction": "mean"},
    "none_weighted": {"alpha": 0.7, "reduction": "none"},
}


@pytest.mark.parametrize("case", list(COMPILE_CASES))
def test_compile_fullgraph_matches_eager(case):
    kw = COMPILE_CASES[case]
    s, ts, y = make_inputs((4, 5, 29), teachers=2, ignore=True, guided_hits=True)
    teachers = ts if "teacher_weights" in kw else ts[0]
    labels = None if not kw else y
    seeds = torch.linspace(0.5, 2.0, 20).view(4, 5)

    def step(x):
        loss = fastkd.kd_loss(x, teachers, labels, backend="cpu", **kw)
        return (loss * seeds).sum() if loss.dim() else 2.5 * loss

    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=recording_backend)
    results = []
    for fn in (compiled, step):
        x = s.clone().requires_grad_(True)
        out = fn(x)
        out.backward()
        results.append((out.detach(), x.grad))
    (c_out, c_grad), (e_out, e_grad) = results
    torch.testing.assert_close(c_out, e_out, rtol=2e-6, atol=0)
    torch.testing.assert_close(c_grad, e_grad, rtol=2e-6, atol=1e-9)
    assert len(graphs) == 1
    # The op sits in the captured graph (inside the autograd.Function's forward subgraph).
    targets = [
        str(n.target)
        for _, module in graphs[0].named_modules()
        if isinstance(module, torch.fx.GraphModule)
        for n in module.graph.nodes
        if n.op == "call_function"
    ]
    assert "fastkd.kd_loss_fwd" in targets, targets


# --- C++ kernel capability variants, FASTKD_BACKEND (subprocesses) ----------------------------


CAPABILITY_SCRIPT = """
    import torch
    from kd_helpers import check_against_reference, make_inputs

    print(torch.backends.cpu.get_cpu_capability())
    torch.manual_seed(0)
    torch.set_num_threads(1)
    for dtype, tdtype in [(torch.float32, torch.float32), (torch.bfloat16, torch.float16),
                          (torch.float16, torch.bfloat16), (torch.float64, torch.float64)]:
        # 37 classes: full vectors of every width (8, 16 floats) and a remainder.
        s, ts, y = make_inputs((6, 37), dtype, tdtype, teachers=2, ignore=True,
                               guided_hits=True)
        for kw in ({}, {"alpha": 0.4, "temperature": 2.0, "label_smoothing": 0.1,
                        "teacher_weights": [1.0, 0.5]},
                   {"guided": True, "alpha": 0.5, "reduction": "none"}):
            check_against_reference("cpu", s, ts if kw else ts[0], y if kw else None, **kw)
    print("ok")
"""


@pytest.mark.parametrize("capability", CPU_CAPABILITIES)
def test_cpu_capability_variants_match_the_reference(capability):
    check_capability_variant(CAPABILITY_SCRIPT, capability)


def test_fastkd_backend_environment_variable():
    proc = run_python(
        """
        import torch
        import fastkd
        from torch.utils._python_dispatch import TorchDispatchMode

        class Ops(TorchDispatchMode):
            names = []
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.names.append(str(func))
                return func(*args, **(kwargs or {}))

        s, t = torch.randn(3, 8), torch.randn(3, 8)
        with Ops() as ops:
            auto = fastkd.kd_loss(s, t)
        assert not any("fastkd" in n for n in ops.names), ops.names
        with Ops() as ops:
            explicit = fastkd.kd_loss(s, t, backend="cpu")
        assert "fastkd.kd_loss_fwd.default" in ops.names, ops.names
        torch.testing.assert_close(auto, explicit)

        # An unknown value is refused when the module is loaded.
        import importlib, os
        os.environ["FASTKD_BACKEND"] = "fast"
        try:
            importlib.reload(fastkd.backends)
        except ValueError as e:
            want = "FASTKD_BACKEND must be one of auto, cpu, cuda, triton, torch, got 'fast'"
            assert want in str(e), e
        else:
            raise AssertionError("FASTKD_BACKEND=fast was accepted")
        print("ok")
        """,
        FASTKD_BACKEND="torch",
    )
    assert proc.returncode == 0 and proc.stdout.split()[-1] == "ok", proc.stderr[-3000:]
