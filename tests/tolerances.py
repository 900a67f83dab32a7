"""The one tolerance table for comparing fastkd's losses and gradients with the float64 reference.

Keyed by the student's dtype (the gradient's dtype). The reference runs in float64 on the *same*
(already rounded) inputs, so input rounding is no error; what remains is:

* float64 (CPU kernel, torch backend): float64 accumulation with exact ``exp``. Measured errors are
  below 1e-14 relative; 1e-10 leaves room for sums over 32768 classes and for T = 50.
* float32 accumulation (float32, bfloat16 and float16 inputs alike): the CPU kernel uses ATen's
  fast ``exp_u20`` (up to 20 ulp, about 2e-6 relative per exponential), Triton and the torch
  backend round to about 1e-7. A row's loss is ``cross / Z_t + lse(s / T) - lse(t / T)``: terms of
  size ``|logit| / T + log C`` that cancel, so the absolute error is about 2e-6 times that size
  (measured <= 5e-6 relative on losses of 10-20 at C = 32768). Loss: atol = rtol = 2e-5.
* Gradients are ``scale * (q - p)``: each entry's error is proportional to the row's largest
  probabilities, not to the entry itself (q - p cancels), so the absolute part of the tolerance is
  a fraction of the largest reference entry (``grad_atol_rel``) plus a floor (``grad_atol``).
  float32: measured <= 4e-6 of the largest entry, so 2e-5; entries themselves 1e-4 relative.
* bfloat16 gradients are rounded once from float32: half an ulp = 2^-8 relative with round to
  nearest (the C++ kernel, measured 3.8e-3), one ulp = 2^-7 = 7.8e-3 when Triton's interpreter
  truncates (measured 7.4e-3). rtol = 2^-6 = 1.6e-2.
* float16 gradients: half an ulp = 2^-11 = 4.9e-4 relative (measured 4.5e-4), rtol = 2e-3; entries
  below 6.1e-5 are subnormal with a fixed spacing of 2^-24 = 6e-8, hence the absolute floor 1e-7.

The loss's ``atol`` is scaled by ``max(1, |reference|)`` (it is relative for large losses, e.g.
logits of 1e4), the gradient's ``grad_atol_rel`` by the largest reference entry.

Across test_kd_loss*.py the largest error is 4% of the float32 loss tolerance, 12% of the
float32 gradient's (Triton; 3% on the C++ kernel), 46% of bfloat16's (Triton's truncation; 23%
with rounding) and 22% of float16's: slack for other machines and for the GPU's larger C, while a
1e-4 relative error in any coefficient still fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tol:
    loss_atol: float
    loss_rtol: float
    grad_atol: float
    grad_atol_rel: float
    grad_rtol: float


_FP32_LOSS = {"loss_atol": 2e-5, "loss_rtol": 2e-5}

TOLERANCES: dict[torch.dtype, Tol] = {
    torch.float64: Tol(loss_atol=1e-10, loss_rtol=1e-10, grad_atol=0.0, grad_atol_rel=1e-10,
                       grad_rtol=1e-9),
    torch.float32: Tol(**_FP32_LOSS, grad_atol=0.0, grad_atol_rel=2e-5, grad_rtol=1e-4),
    torch.bfloat16: Tol(**_FP32_LOSS, grad_atol=0.0, grad_atol_rel=2e-5, grad_rtol=1.6e-2),
    torch.float16: Tol(**_FP32_LOSS, grad_atol=1e-7, grad_atol_rel=2e-5, grad_rtol=2e-3),
}


def assert_loss_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                      msg: str = "") -> None:
    """A loss (scalar or per-row) of a `dtype` student against the float64 reference."""
    tol = TOLERANCES[dtype]
    expected = expected.detach().double()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().double(), expected, atol=tol.loss_atol * scale, rtol=tol.loss_rtol,
        equal_nan=False, msg=lambda m: f"loss {msg}\n{m}",
    )


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype,
                      msg: str = "", *, min_scale: float = 0.0) -> None:
    """The student's gradient (in `dtype`) against the float64 reference gradient.

    `min_scale` stands in for the largest entry when the reference is (nearly) all zeros although
    its terms are not, e.g. q - p with one class, where rounding leaves ~1e-9 instead of 0.
    """
    tol = TOLERANCES[dtype]
    assert actual.dtype == dtype, f"gradient dtype {actual.dtype}, expected {dtype} {msg}"
    expected = expected.detach().double()
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, min_scale)
    torch.testing.assert_close(
        actual.detach().double(), expected, atol=tol.grad_atol + tol.grad_atol_rel * scale,
        rtol=tol.grad_rtol, equal_nan=False, msg=lambda m: f"gradient {msg}\n{m}",
    )
