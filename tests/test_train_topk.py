"""The partial-teacher (top-k) target of fastkd.train.topk."""

import math

import pytest
import torch

import fastkd
from fastkd.train import partial_teacher, partial_teacher_logits


def _target(z: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(z / temperature, dim=-1)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("k", [1, 3, 9])
def test_keeps_top_k_and_spreads_the_rest(k, temperature):
    gen = torch.Generator().manual_seed(k)
    t = torch.randn(6, 10, generator=gen, dtype=torch.float64) * 3
    p = torch.softmax(t / temperature, dim=-1)
    r = _target(partial_teacher_logits(t, k, temperature).double(), temperature)
    torch.testing.assert_close(r.sum(-1), torch.ones(6, dtype=torch.float64))
    top, idx = p.topk(k, dim=-1)
    torch.testing.assert_close(r.gather(-1, idx), top.to(r.dtype), atol=1e-6, rtol=1e-5)
    rest = torch.ones_like(r, dtype=torch.bool).scatter(-1, idx, False)
    expected = (1 - top.sum(-1, keepdim=True)) / (10 - k)
    torch.testing.assert_close(r[rest].view(6, 10 - k), expected.expand(6, 10 - k).to(r.dtype),
                               atol=1e-6, rtol=1e-5)


def test_k_at_least_classes_is_the_full_teacher():
    t = torch.randn(4, 5)
    r = _target(partial_teacher_logits(t, 5, 2.0), 2.0)
    torch.testing.assert_close(r, torch.softmax(t / 2.0, dim=-1))


def test_exhausted_mass_gives_minus_inf_and_a_finite_loss():
    # One class takes all the mass in float32: the spread remainder is exactly 0.
    t = torch.tensor([[100.0, 0.0, 0.0, 0.0]])
    z = partial_teacher_logits(t, 1, 1.0)
    assert z[0, 0] == 0.0 and torch.isinf(z[0, 1:]).all() and (z[0, 1:] < 0).all()
    s = torch.randn(1, 4, requires_grad=True)
    loss = fastkd.kd_loss(s, z, temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_kd_loss_on_the_target_is_t2_kl(k):
    """fastkd.kd_loss(s, T log r) equals T^2 KL(r || q), computed directly."""
    gen = torch.Generator().manual_seed(0)
    T = 3.0
    t = torch.randn(5, 7, generator=gen)
    s = torch.randn(5, 7, generator=gen, dtype=torch.float32, requires_grad=True)
    z = partial_teacher_logits(t, k, T)
    loss = fastkd.kd_loss(s, z, temperature=T)
    r = _target(z.double(), T)
    logq = torch.log_softmax(s.double() / T, dim=-1)
    expected = T * T * (r * (torch.log(r) - logq)).sum() / 5
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)
    loss.backward()
    q = logq.exp()
    torch.testing.assert_close(s.grad.double(), (T / 5) * (q - r), atol=1e-6, rtol=1e-4)


def test_bfloat16_teacher_runs_in_float32():
    t = torch.randn(3, 6).bfloat16()
    assert partial_teacher_logits(t, 2, 1.0).dtype == torch.float32


@pytest.mark.parametrize("k, temperature, error", [
    (0, 1.0, ValueError), (1.5, 1.0, ValueError), (True, 1.0, ValueError), (2, 0.0, ValueError),
])
def test_bad_arguments(k, temperature, error):
    with pytest.raises(error):
        partial_teacher_logits(torch.randn(2, 5), k, temperature)
    with pytest.raises(TypeError):
        partial_teacher_logits(torch.ones(2, 5, dtype=torch.int64), 1, 1.0)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("k", [1, 3, 9, 10])
def test_sparse_partial_teacher_is_the_same_target(k, temperature):
    """partial_teacher (the trainer's sparse form) stands for a d with softmax(d / T) = r, and
    kd_loss on it equals kd_loss on the dense target logits."""
    gen = torch.Generator().manual_seed(k)
    t = torch.randn(6, 10, generator=gen, dtype=torch.float64) * 3
    s = torch.randn(6, 10, generator=gen)
    sparse = partial_teacher(t, k, temperature)
    assert sparse.k == min(k, 10)
    r = _target(partial_teacher_logits(t, k, temperature).double(), temperature)
    ids, values, tails = sparse._for_kernel(10, torch.float64)
    d = tails[:, None].expand(-1, 10).clone().scatter(-1, ids.long(), values)
    torch.testing.assert_close(_target(d, temperature), r, atol=1e-6, rtol=1e-5)
    dense = fastkd.kd_loss(s, partial_teacher_logits(t, k, temperature), temperature=temperature)
    assert math.isclose(fastkd.kd_loss(s, sparse, temperature=temperature).item(), dense.item(),
                        rel_tol=1e-5)
