"""Properties of fastkd.kd_loss over hypothesis-drawn shapes, values and options.

The C++ backend runs in float64 (where the properties hold to ~1e-12) and in float32; Triton
(interpreted, ~10 ms a row) in float32 on fewer, smaller examples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from conftest import CPU_BACKENDS
from hypothesis import given, settings
from hypothesis import strategies as st
from kd_helpers import IGNORE, INTERPRETER_NOISE, _seed, backend_grad  # noqa: F401
from tolerances import TOLERANCES

pytestmark = INTERPRETER_NOISE

# (backend, dtype, examples, max rows, max classes, max teachers)
CONFIGS = [("cpu", torch.float64, 40, 6, 40, 4), ("cpu", torch.float32, 40, 6, 40, 4)]
if "triton" in CPU_BACKENDS:
    CONFIGS.append(("triton", torch.float32, 6, 3, 24, 2))
IDS = [f"{c[0]}-{str(c[1]).removeprefix('torch.')}" for c in CONFIGS]


@dataclass
class Case:
    student: torch.Tensor
    teachers: list[torch.Tensor]
    labels: torch.Tensor | None
    kwargs: dict = field(default_factory=dict)

    @property
    def classes(self) -> int:
        return self.student.shape[-1]

    @property
    def counted(self) -> int:
        if self.labels is None:
            return self.student.numel() // self.classes
        return int((self.labels != IGNORE).sum())


@st.composite
def cases(draw, dtype, max_rows, max_classes, max_teachers, *, ce=True, guided=True,
          ignore=True):
    rows = draw(st.integers(1, max_rows))
    lead = draw(st.sampled_from([(rows,), (1, rows), (rows, 1)]))
    classes = draw(st.integers(1, max_classes))
    k = draw(st.integers(1, max_teachers))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.01, 1.0, 4.0, 20.0]))

    def logits():
        x = torch.randn(*lead, classes, generator=gen, dtype=torch.float64) * scale
        return x.to(dtype)

    student, teachers = logits(), [logits() for _ in range(k)]
    kw: dict = {"temperature": draw(st.sampled_from([0.5, 1.0, 2.0, 7.0]))}
    if k > 1 or draw(st.booleans()):
        kw["teacher_weights"] = draw(st.lists(st.sampled_from([0.0, 0.25, 1.0, 3.0]),
                                              min_size=k, max_size=k))
    use_ce = ce and draw(st.booleans())
    use_guided = guided and draw(st.booleans())
    use_ignore = ignore and draw(st.booleans())
    labels = None
    if use_ce or use_guided or use_ignore:
        labels = torch.randint(0, classes, lead, generator=gen)
        if use_guided:  # the first teacher right on some rows
            hits = torch.rand(lead, generator=gen) < 0.5
            t0 = teachers[0].double()
            t0[hits] = t0[hits].scatter(-1, labels[hits].unsqueeze(-1), float(t0.max()) + 1)
            teachers[0] = t0.to(dtype)
        if use_ignore:
            labels[torch.rand(lead, generator=gen) < 0.3] = IGNORE
    if use_ce:
        kw["alpha"] = draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
        kw["label_smoothing"] = draw(st.sampled_from([0.0, 0.1]))
    if use_guided:
        kw["guided"] = True
    return Case(student, teachers, labels, kw)


def _loss(backend: str, case: Case, student=None, teachers=None, **override):
    kw = {**case.kwargs, **override}
    return backend_grad(backend, case.student if student is None else student,
                        case.teachers if teachers is None else teachers, case.labels, **kw)


def _atol(dtype: torch.dtype, case: Case, magnitude: float = 1.0) -> float:
    """Absolute slack for a loss whose terms have `magnitude`: a loss row is a sum of terms
    ~ |logit| / T + log C, times T^2."""
    tol = TOLERANCES[dtype]
    logit = max(float(case.student.abs().max()), *(float(t.abs().max()) for t in case.teachers))
    temperature = case.kwargs["temperature"]
    size = logit / temperature + 1.0 + torch.log(torch.tensor(float(case.classes))).item()
    return 10 * tol.loss_atol * magnitude * size * max(1.0, temperature) ** 2


def _grad_atol(dtype: torch.dtype, case: Case) -> float:
    """Absolute slack for a gradient entry (batchmean): a fraction (the table's, times 10) of
    the largest term, T * sum(teacher weights) + 1 (CE) over the counted rows."""
    weights = case.kwargs.get("teacher_weights") or [1.0] * len(case.teachers)
    bound = case.kwargs["temperature"] * sum(weights) + 1.0
    return 10 * TOLERANCES[dtype].grad_atol_rel * bound / max(1, case.counted)


def _run(config, strategy_kwargs, check):
    backend, dtype, examples, rows, classes, teachers = config

    @settings(max_examples=examples)
    @given(case=cases(dtype, rows, classes, teachers, **strategy_kwargs))
    def run(case):
        check(backend, dtype, case)

    run()


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_kd_without_ce_is_nonnegative(config):
    def check(backend, dtype, case):
        loss, _ = _loss(backend, case, reduction="none")
        assert (loss >= -_atol(dtype, case)).all(), loss

    _run(config, {"ce": False}, check)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_identical_logits_give_zero_loss_and_gradient(config):
    def check(backend, dtype, case):
        loss, grad = _loss(backend, case, teachers=[case.student.clone()] * len(case.teachers))
        assert abs(float(loss)) <= _atol(dtype, case), loss
        assert grad.abs().max() <= _grad_atol(dtype, case), grad.abs().max()

    _run(config, {"ce": False}, check)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_invariant_to_a_constant_per_row(config):
    def check(backend, dtype, case):
        gen = torch.Generator().manual_seed(case.student.numel())
        lead = case.student.shape[:-1]

        def shift(x):
            return (x.double() + torch.randn(*lead, 1, generator=gen, dtype=torch.float64) * 10
                    ).to(dtype)

        base_loss, base_grad = _loss(backend, case)
        loss, grad = _loss(backend, case, student=shift(case.student),
                           teachers=[shift(t) for t in case.teachers])
        # Shifting by ~10 rounds float32 logits again (~1e-6 absolute).
        more = 1.0 if dtype == torch.float64 else 30.0
        torch.testing.assert_close(loss, base_loss, atol=more * _atol(dtype, case), rtol=0)
        torch.testing.assert_close(grad, base_grad, atol=more * _grad_atol(dtype, case), rtol=0)

    _run(config, {}, check)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_reductions_agree(config):
    def check(backend, dtype, case):
        losses = {r: _loss(backend, case, reduction=r) for r in ("batchmean", "sum", "mean",
                                                                  "none")}
        slack = _atol(dtype, case, magnitude=case.student.numel())
        # "none" is backpropagated with a different weight per row (kd_helpers), so only the
        # scalar reductions' gradients are compared.
        (none, _), (total, g_sum) = losses["none"], losses["sum"]
        torch.testing.assert_close(none.sum(), total, atol=slack, rtol=1e-6)
        if not case.kwargs.get("guided"):
            n = case.counted
            batchmean, g_bm = losses["batchmean"]
            torch.testing.assert_close(batchmean * n, total, atol=slack, rtol=1e-5)
            torch.testing.assert_close(g_bm * n, g_sum, atol=n * _grad_atol(dtype, case),
                                       rtol=1e-4)
            if "alpha" not in case.kwargs:
                mean, _ = losses["mean"]
                torch.testing.assert_close(mean * case.classes, batchmean, atol=slack, rtol=1e-5)

    _run(config, {}, check)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_cohort_is_the_weighted_sum_of_its_teachers(config):
    def check(backend, dtype, case):
        weights = case.kwargs.get("teacher_weights") or [1.0] * len(case.teachers)
        loss, grad = _loss(backend, case)
        parts = [_loss(backend, case, teachers=[t], teacher_weights=None)
                 for t in case.teachers]
        want_loss = sum(w * p[0] for w, p in zip(weights, parts, strict=True))
        want_grad = sum(w * p[1].double() for w, p in zip(weights, parts, strict=True))
        slack = _atol(dtype, case, magnitude=sum(weights) + 1)
        torch.testing.assert_close(loss, want_loss, atol=slack, rtol=1e-5)
        torch.testing.assert_close(grad.double(), want_grad, atol=_grad_atol(dtype, case),
                                   rtol=1e-4)

    _run(config, {"ce": False}, check)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_gradient_rows_sum_to_zero(config):
    """sum_c (q - p) = 0 and sum_c (softmax(s) - target) = 0: a shift of a whole row changes
    nothing."""

    def check(backend, dtype, case):
        _, grad = _loss(backend, case)
        row_sums = grad.double().sum(-1)
        assert row_sums.abs().max() <= _grad_atol(dtype, case) * case.classes, row_sums

    _run(config, {}, check)

