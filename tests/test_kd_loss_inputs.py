"""Bad input to fastkd.kd_loss, fastkd.nn.KDLoss and the ops: a clear exception naming the
argument, never a crash, a hang, a NaN or a wrong answer."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import CPU_BACKENDS
from kd_helpers import INTERPRETER_NOISE, _seed, check_against_reference, make_inputs  # noqa: F401

import fastkd

pytestmark = INTERPRETER_NOISE

B, C = 4, 10


def s_():
    return torch.randn(B, C)


def t_():
    return torch.randn(B, C)


def y_():
    return torch.randint(0, C, (B,))


def _call(student=None, teacher=None, labels="default", **kw):
    student = s_() if student is None else student
    teacher = t_() if teacher is None else teacher
    labels = y_() if labels == "default" else labels
    return fastkd.kd_loss(student, teacher, labels, **kw)


# (id, thunk, exception, message pattern)
BAD_CALLS = [
    # logits
    ("student_not_tensor", lambda: _call(student=[[0.0] * C] * B), TypeError,
     r"student_logits must be a torch.Tensor"),
    ("student_int", lambda: _call(student=torch.randint(0, 5, (B, C))), TypeError,
     r"student_logits must be float32, bfloat16, float16 or float64, got torch.int64"),
    ("teacher_int", lambda: _call(teacher=torch.randint(0, 5, (B, C))), TypeError,
     r"teacher_logits must be float32"),
    ("cohort_member_int", lambda: _call(teacher=[t_(), torch.ones(B, C, dtype=torch.int32)]),
     TypeError, r"teacher_logits\[1\] must be float32"),
    ("teacher_not_tensor", lambda: _call(teacher=3.0), TypeError,
     r"teacher_logits must be a tensor or a list/tuple of tensors"),
    ("student_bool", lambda: _call(student=torch.ones(B, C, dtype=torch.bool)), TypeError,
     r"student_logits must be float32"),
    ("float64_with_float32", lambda: _call(student=s_().double()), TypeError,
     r"float64 logits must be float64 for student_logits and teacher_logits alike"),
    ("mismatched_rows", lambda: _call(teacher=torch.randn(B + 1, C), labels=None), ValueError,
     r"teacher_logits must have the student's shape \(4, 10\), got \(5, 10\) "
     r"\(mismatched shape\)"),
    ("mismatched_classes", lambda: _call(teacher=torch.randn(B, C + 1), labels=None), ValueError,
     r"teacher_logits must have the student's shape \(4, 10\), got \(4, 11\) "
     r"\(mismatched class count\)"),
    ("mismatched_rank", lambda: _call(teacher=torch.randn(1, B, C), labels=None), ValueError,
     r"teacher_logits must have the student's shape"),
    ("cohort_member_classes", lambda: _call(teacher=[t_(), torch.randn(B, C - 1)]), ValueError,
     r"teacher_logits\[1\] must have the student's shape .*class count"),
    ("teacher_on_meta", lambda: _call(teacher=torch.randn(B, C, device="meta")), ValueError,
     r"teacher_logits is on meta but student_logits is on cpu"),
    ("labels_on_meta", lambda: _call(labels=torch.zeros(B, dtype=torch.long, device="meta")),
     ValueError, r"labels is on meta but student_logits is on cpu"),
    ("empty_batch", lambda: _call(student=torch.randn(0, C), teacher=torch.randn(0, C),
                                  labels=None), ValueError,
     r"student_logits must hold at least one row and one class, got shape \(0, 10\) "
     r"\(empty batch\)"),
    ("no_classes", lambda: _call(student=torch.randn(B, 0), teacher=torch.randn(B, 0),
                                 labels=None), ValueError,
     r"student_logits must hold at least one row and one class, got shape \(4, 0\)"),
    ("scalar_logits", lambda: _call(student=torch.tensor(1.0), teacher=torch.tensor(1.0),
                                    labels=None), ValueError,
     r"student_logits must have a class dimension"),
    ("empty_cohort", lambda: _call(teacher=[]), ValueError,
     r"teacher_logits must not be an empty list"),
    # temperature
    ("temperature_zero", lambda: _call(temperature=0.0), ValueError,
     r"temperature must be > 0.0, got 0.0"),
    ("temperature_negative", lambda: _call(temperature=-2), ValueError,
     r"temperature must be > 0.0, got -2.0"),
    ("temperature_nan", lambda: _call(temperature=math.nan), ValueError,
     r"temperature must be finite, got nan"),
    ("temperature_inf", lambda: _call(temperature=math.inf), ValueError,
     r"temperature must be finite, got inf"),
    ("temperature_str", lambda: _call(temperature="4"), TypeError,
     r"temperature must be a real number, got str"),
    ("temperature_tensor", lambda: _call(temperature=torch.tensor(4.0)), TypeError,
     r"temperature must be a real number, got Tensor"),
    ("temperature_bool", lambda: _call(temperature=True), TypeError,
     r"temperature must be a real number, got bool"),
    # labels
    ("labels_float", lambda: _call(labels=y_().float(), alpha=0.5), TypeError,
     r"labels must be an int64 or int32 tensor, got torch.float32"),
    ("labels_int16", lambda: _call(labels=y_().short(), alpha=0.5), TypeError,
     r"labels must be an int64 or int32 tensor, got torch.int16"),
    ("labels_list", lambda: _call(labels=[0] * B, alpha=0.5), TypeError,
     r"labels must be a torch.Tensor, got list"),
    ("labels_shape", lambda: _call(labels=torch.zeros(B, 1, dtype=torch.long), alpha=0.5),
     ValueError, r"labels must have shape \(4,\) \(the logits' leading dims\), got \(4, 1\)"),
    ("labels_length", lambda: _call(labels=torch.zeros(B + 1, dtype=torch.long)), ValueError,
     r"labels must have shape \(4,\)"),
    ("alpha_without_labels", lambda: _call(labels=None, alpha=0.5), ValueError,
     r"alpha mixes in cross-entropy on hard labels: pass labels"),
    ("guided_without_labels", lambda: _call(labels=None, guided=True), ValueError,
     r"guided=True compares the teacher's argmax with labels: pass labels"),
    # alpha, label_smoothing, guided, ignore_index
    ("alpha_negative", lambda: _call(alpha=-0.1), ValueError, r"alpha must be >= 0.0, got -0.1"),
    ("alpha_above_one", lambda: _call(alpha=1.5), ValueError, r"alpha must be <= 1.0, got 1.5"),
    ("alpha_nan", lambda: _call(alpha=math.nan), ValueError, r"alpha must be finite"),
    ("alpha_str", lambda: _call(alpha="0.5"), TypeError, r"alpha must be a real number"),
    ("smoothing_without_alpha", lambda: _call(label_smoothing=0.1), ValueError,
     r"label_smoothing applies to the cross-entropy term, which needs alpha"),
    ("smoothing_negative", lambda: _call(alpha=0.5, label_smoothing=-0.1), ValueError,
     r"label_smoothing must be >= 0.0"),
    ("smoothing_above_one", lambda: _call(alpha=0.5, label_smoothing=1.1), ValueError,
     r"label_smoothing must be <= 1.0"),
    ("guided_int", lambda: _call(guided=1), TypeError, r"guided must be a bool, got int"),
    ("ignore_index_float", lambda: _call(ignore_index=-100.0), TypeError,
     r"ignore_index must be an int, got float"),
    # teacher_weights
    ("weights_length", lambda: _call(teacher=[t_(), t_()], teacher_weights=[1.0]), ValueError,
     r"teacher_weights must hold 2 values"),
    ("weights_negative", lambda: _call(teacher=[t_(), t_()], teacher_weights=[-1.0, 1.0]),
     ValueError, r"teacher_weights\[0\] must be >= 0.0, got -1.0"),
    ("weights_nan", lambda: _call(teacher=[t_(), t_()], teacher_weights=[1.0, math.nan]),
     ValueError, r"teacher_weights\[1\] must be finite, got nan"),
    ("weights_inf", lambda: _call(teacher_weights=[math.inf]), ValueError,
     r"teacher_weights\[0\] must be finite"),
    ("weights_2d", lambda: _call(teacher_weights=torch.ones(1, 1)), ValueError,
     r"teacher_weights must be 1-D"),
    ("weights_str", lambda: _call(teacher_weights="1"), TypeError,
     r"teacher_weights must be a list or tuple of numbers"),
    ("weights_element_str", lambda: _call(teacher_weights=["1"]), TypeError,
     r"teacher_weights\[0\] must be a real number"),
    # reduction, backend
    ("reduction_unknown", lambda: _call(reduction="avg"), ValueError,
     r"reduction must be one of 'batchmean', 'sum', 'mean', 'none', got 'avg'"),
    ("reduction_none_object", lambda: _call(reduction=None), ValueError,
     r"reduction must be one of"),
    ("backend_unknown", lambda: _call(backend="gpu"), ValueError,
     r"backend must be one of 'auto', 'cpu', 'cuda', 'triton', 'torch', got 'gpu'"),
]


@pytest.mark.parametrize("thunk,exc,match", [c[1:] for c in BAD_CALLS],
                         ids=[c[0] for c in BAD_CALLS])
def test_bad_input(thunk, exc, match):
    with pytest.raises(exc, match=match):
        thunk()


# --- backends that cannot run the inputs ------------------------------------------------------


def _reasons(message: str) -> dict[str, str]:
    """{backend: reason} from "... (cpu: why; cuda: why; ...)"."""
    inner = message[message.index("(") + 1 : message.rindex(")")]
    parts = re.split(r"; (?=(?:cpu|cuda|triton|torch): )", inner)
    return dict(part.split(": ", 1) for part in parts)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_backend_on_cpu_tensors_lists_every_reason():
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run these inputs") as info:
        _call(backend="cuda")
    reasons = _reasons(str(info.value))
    assert set(reasons) == {"cpu", "cuda", "triton", "torch"}
    assert reasons["cuda"] == "tensors are on cpu, not a CUDA device"
    assert reasons["cpu"] == "available" and reasons["torch"] == "available"


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "torch"])
def test_nine_teachers_on_a_kernel_backend_lists_every_reason(backend):
    with pytest.raises(ValueError, match=rf"backend='{backend}' cannot run these inputs") as info:
        _call(teacher=[t_() for _ in range(9)], backend=backend)
    reasons = _reasons(str(info.value))
    assert set(reasons) == {"cpu", "cuda", "triton", "torch"}
    assert reasons["cpu"] == "9 teachers; the kernels take at most 8"
    assert reasons[backend] == "9 teachers; the kernels take at most 8"
    assert reasons["torch"] == "available"


def test_float64_on_triton_and_meta_tensors_on_cpu():
    with pytest.raises(ValueError, match=r"triton: float64 runs on the CPU backend only"):
        _call(student=s_().double(), teacher=t_().double(), backend="triton")
    with pytest.raises(ValueError, match=r"cpu: tensors are on meta, not the CPU"):
        _call(student=torch.randn(B, C, device="meta"), teacher=torch.randn(B, C, device="meta"),
              labels=None, backend="cpu")
    # auto falls back to the torch backend for tensors no kernel takes (shape only, on meta).
    out = _call(student=torch.randn(B, C, device="meta"), teacher=torch.randn(B, C, device="meta"),
                labels=None, reduction="none")
    assert out.device.type == "meta" and out.shape == (B,)


# --- label values (checked by the ops) -------------------------------------------------------

LABEL_CASES = {
    "too_large": (C, {}),
    "too_large_ce": (C, {"alpha": 0.5}),
    "too_large_guided": (C + 7, {"guided": True}),
    "negative_ce": (-1, {"alpha": 0.5}),
    "negative_kd": (-3, {}),
    "other_ignore_index": (-100, {"alpha": 0.5, "ignore_index": -1}),
}


@pytest.mark.parametrize("case", list(LABEL_CASES))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_label_out_of_range(backend, case):
    bad, kw = LABEL_CASES[case]
    y = y_()
    y[2] = bad
    with pytest.raises(RuntimeError, match=rf"labels must be in \[0, {C}\) or equal ignore_index"):
        _call(labels=y, backend=backend, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_custom_ignore_index(backend):
    s, ts, y = make_inputs((6, C), ignore=True)
    y[y == -100] = -1
    check_against_reference(backend, s, ts[0], y, alpha=0.5, ignore_index=-1)
    y[y == -1] = C + 5  # any value may be the ignore_index, even one outside [0, C)
    check_against_reference(backend, s, ts[0], y, alpha=0.5, ignore_index=C + 5)


# --- the module's constructor ----------------------------------------------------------------

BAD_MODULES = [
    ("temperature_zero", {"temperature": 0}, ValueError, r"temperature must be > 0.0"),
    ("temperature_nan", {"temperature": math.nan}, ValueError, r"temperature must be finite"),
    ("temperature_str", {"temperature": "2"}, TypeError, r"temperature must be a real number"),
    ("alpha_range", {"alpha": 1.2}, ValueError, r"alpha must be <= 1.0"),
    ("alpha_str", {"alpha": "x"}, TypeError, r"alpha must be a real number"),
    ("smoothing_without_alpha", {"label_smoothing": 0.1}, ValueError, r"needs alpha"),
    ("smoothing_range", {"alpha": 0.5, "label_smoothing": 2.0}, ValueError,
     r"label_smoothing must be <= 1.0"),
    ("guided_str", {"guided": "yes"}, TypeError, r"guided must be a bool"),
    ("ignore_index_float", {"ignore_index": 1.0}, TypeError, r"ignore_index must be an int"),
    ("weights_negative", {"teacher_weights": [1.0, -0.5]}, ValueError,
     r"teacher_weights\[1\] must be >= 0.0"),
    ("weights_nan", {"teacher_weights": [math.nan]}, ValueError,
     r"teacher_weights\[0\] must be finite"),
    ("weights_not_a_sequence", {"teacher_weights": 3}, TypeError,
     r"teacher_weights must be a list or tuple of numbers, got int"),
    ("reduction", {"reduction": "avg"}, ValueError, r"reduction must be one of"),
    ("backend", {"backend": "gpu"}, ValueError, r"backend must be one of"),
]


@pytest.mark.parametrize("kwargs,exc,match", [c[1:] for c in BAD_MODULES],
                         ids=[c[0] for c in BAD_MODULES])
def test_kdloss_constructor_checks(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastkd.nn.KDLoss(**kwargs)


def test_kdloss_forward_checks():
    criterion = fastkd.nn.KDLoss(teacher_weights=[1.0, 2.0], alpha=0.5)
    with pytest.raises(ValueError, match=r"teacher_weights must hold 1 values"):
        criterion(s_(), t_(), y_())
    with pytest.raises(ValueError, match=r"alpha mixes in cross-entropy"):
        criterion(s_(), [t_(), t_()])
    with pytest.raises(ValueError, match=r"teacher_logits\[1\] must have the student's shape"):
        criterion(s_(), [t_(), torch.randn(B, C + 1)], y_())


# --- the ops themselves ------------------------------------------------------------------------


def _op_args(**override):
    args = dict(
        student=torch.randn(B, 1, C), teachers=[torch.randn(B, 1, C)], labels=None,
        kd_row_weights=None, ce_row_weights=None, kd_coefs=[1.0], ce_coef=0.0, temperature=1.0,
        label_smoothing=0.0, ignore_index=-100, per_row=False, compute_grad=True,
        sparse_ids=[], sparse_values=[], sparse_tails=[],
    )
    args.update(override)
    return list(args.values())


OP_CASES = [
    ("student_2d", {"student": torch.randn(B, C)}, r"student must be 3-D"),
    ("student_int", {"student": torch.ones(B, 1, C, dtype=torch.long)},
     r"student must be float32, bfloat16, float16 or float64"),
    ("teacher_shape", {"teachers": [torch.randn(B, 1, C + 1)]}, r"teacher 0 has shape"),
    ("teacher_dtypes", {"teachers": [torch.randn(B, 1, C), torch.randn(B, 1, C).half()],
                        "kd_coefs": [1.0, 1.0]}, r"all teachers must share one dtype"),
    ("no_teacher", {"teachers": [], "kd_coefs": []}, r"takes 1 to 8 teachers, got 0"),
    ("nine_teachers", {"teachers": [torch.randn(B, 1, C)] * 9, "kd_coefs": [1.0] * 9},
     r"takes 1 to 8 teachers, got 9"),
    ("kd_coefs_length", {"kd_coefs": [1.0, 2.0]}, r"kd_coefs must hold one value per teacher"),
    ("kd_coefs_nan", {"kd_coefs": [math.nan]}, r"kd_coefs must be finite"),
    ("temperature_zero", {"temperature": 0.0}, r"temperature must be a finite number > 0"),
    ("smoothing", {"label_smoothing": 1.5}, r"label_smoothing must be in \[0, 1\]"),
    ("ce_without_labels", {"ce_coef": 0.5}, r"ce_coef != 0 needs labels"),
    ("labels_int32", {"labels": torch.zeros(B, dtype=torch.int32)}, r"labels must be int64"),
    ("labels_length", {"labels": torch.zeros(B + 1, dtype=torch.long)},
     r"labels must be a contiguous vector of 4 values"),
    ("labels_strided", {"labels": torch.zeros(2 * B, dtype=torch.long)[::2]},
     r"labels must be a contiguous vector"),
    ("labels_range", {"labels": torch.full((B,), C), "ce_coef": 0.5},
     r"labels must be in \[0, 10\) or equal ignore_index \(-100\); row 0 has label 10"),
    ("row_weights_shape", {"kd_row_weights": torch.ones(B)}, r"kd_row_weights must be \[1, 4\]"),
    ("row_weights_dtype", {"kd_row_weights": torch.ones(1, B, dtype=torch.float64)},
     r"kd_row_weights must be Float"),
    ("ce_row_weights_shape", {"ce_row_weights": torch.ones(B + 1)},
     r"ce_row_weights must be a contiguous vector of 4 values"),
]


@pytest.mark.parametrize("override,match", [c[1:] for c in OP_CASES],
                         ids=[c[0] for c in OP_CASES])
def test_cpu_op_checks_its_arguments(override, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastkd.kd_loss_fwd(*_op_args(**override))


def test_cpu_op_rejects_a_strided_class_dim():
    student = torch.randn(B, 1, 2 * C)[:, :, ::2]
    with pytest.raises(RuntimeError, match=r"student must have a contiguous last dimension"):
        torch.ops.fastkd.kd_loss_fwd(*_op_args(student=student))


@pytest.mark.parametrize("grad,grad_output,match", [
    (torch.randn(B, C), torch.ones(B + 1), r"grad_output must be a scalar or hold one value per "
                                           r"row \(4\)"),
    (torch.randn(B, C), torch.ones((), dtype=torch.long), r"grad_output must be float32 or "
                                                          r"float64"),
    (torch.randn(C, B).t(), torch.ones(()), r"scale_grad_ needs a contiguous floating-point"),
])
def test_scale_grad_checks_its_arguments(grad, grad_output, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastkd.scale_grad_(grad, grad_output)
