"""Hard-concrete math vs independent references (closed forms, Monte Carlo, a per-row loop)."""

import math

import pytest
import torch

from llmshearing.pruning import hard_concrete as hc


def test_constants_match_spec():
    assert hc.BETA == pytest.approx(2 / 3)
    assert (hc.LIMIT_L, hc.LIMIT_R, hc.EPS) == (-0.1, 1.1, 1e-6)
    assert hc.LOG_ALPHA_MIN == pytest.approx(-4.60517, abs=1e-5)
    assert hc.LOG_ALPHA_MAX == pytest.approx(4.60517, abs=1e-5)
    assert (hc.INIT_MEAN, hc.INIT_STD) == (5.0, 0.01)


def test_init_is_clamped_fp32():
    g = torch.Generator().manual_seed(0)
    t = hc.init_log_alpha((3, 5), generator=g)
    assert t.dtype == torch.float32 and t.shape == (3, 5)
    # mean 5 > log(100): effective init is the clamp maximum
    assert torch.allclose(t, torch.full((3, 5), math.log(100.0)))
    t2 = hc.init_log_alpha((1000,), mean=0.0, std=0.01, generator=g)
    assert abs(float(t2.mean())) < 0.01 and 0.005 < float(t2.std()) < 0.015


def test_prob_nonzero_closed_form_values():
    la = torch.tensor([math.log(100.0), 0.0, math.log(0.01)])
    # values quoted by the reference notes: 0.998, 0.832, 0.047
    p = hc.prob_nonzero(la)
    assert p.tolist() == pytest.approx([0.998, 0.832, 0.047], abs=1e-3)
    # independent formula: P(stretched s > 0) = P(sigmoid(...) > -l/(r-l)) = sigmoid(log_alpha - beta*logit(x0))
    x0 = 0.1 / 1.2
    ref = torch.sigmoid(la - hc.BETA * math.log(x0 / (1 - x0)))
    assert torch.allclose(p, ref, atol=1e-6)


def test_sample_range_and_probability_monte_carlo():
    torch.manual_seed(0)
    la = torch.tensor([-3.0, -1.0, 0.0, 1.5, 4.0]).expand(20000, 5).contiguous()
    z = hc.sample(la)
    assert z.dtype == torch.float32
    assert float(z.min()) >= 0.0 and float(z.max()) <= 1.0
    frac_nonzero = (z > 0).float().mean(0)
    assert torch.allclose(frac_nonzero, hc.prob_nonzero(la[0]), atol=0.015)
    # a hard-concrete sample hits exact 0 and exact 1 with positive probability
    assert float((z == 0).float().mean()) > 0.01 and float((z == 1).float().mean()) > 0.05


def test_sample_is_differentiable_and_bf16_input_gives_fp32():
    la = torch.zeros(4, 6, dtype=torch.bfloat16, requires_grad=True)
    z = hc.sample(la)
    assert z.dtype == torch.float32
    z.sum().backward()
    assert la.grad is not None and la.grad.shape == (4, 6)


def test_clamp_at_use_value_and_gradient():
    la = torch.tensor([-10.0, 0.5, 10.0], requires_grad=True)
    v = hc.clamp_at_use(la)
    assert v.tolist() == pytest.approx([hc.LOG_ALPHA_MIN, 0.5, hc.LOG_ALPHA_MAX])
    v.sum().backward()
    assert la.grad.tolist() == [1.0, 1.0, 1.0]  # straight-through


def _deterministic_loop(log_alpha: torch.Tensor, n_keep) -> torch.Tensor:
    """Reference: the original per-row Python loop (zero the (n - keep) smallest soft scores)."""
    soft = torch.sigmoid(log_alpha / (2 / 3) * 0.8)
    rows = soft.reshape(-1, soft.shape[-1]).clone()
    keeps = [n_keep] * rows.shape[0] if isinstance(n_keep, int) else n_keep.reshape(-1).tolist()
    for r in range(rows.shape[0]):
        n_remove = rows.shape[1] - keeps[r]
        if n_remove > 0:
            idx = sorted(range(rows.shape[1]), key=lambda i: float(rows[r, i]))[:n_remove]
            rows[r, idx] = 0.0
    return rows.reshape(soft.shape)


@pytest.mark.parametrize("shape", [(7,), (3, 9), (2, 3, 4)])
def test_deterministic_matches_per_row_loop(shape):
    torch.manual_seed(1)
    la = torch.randn(shape) * 2
    n = shape[-1]
    for k in (0, 1, n // 2, n):
        assert torch.equal(hc.deterministic(la, k), _deterministic_loop(la, k))
    # per-row counts (tensor)
    per_row = torch.randint(0, n + 1, shape[:-1])
    got = hc.deterministic(la, per_row)
    assert torch.equal(got, _deterministic_loop(la, per_row))
    assert torch.equal((got != 0).sum(-1), per_row)


def test_deterministic_with_expected_count_matches_reference_rounding():
    torch.manual_seed(2)
    la = torch.randn(5, 11) * 3
    p = hc.prob_nonzero(la)
    want_keep = torch.tensor([11 - round(float(11 - p[r].sum())) for r in range(5)])
    got_keep = hc.expected_n_keep(la)
    assert torch.equal(got_keep, want_keep)
    assert torch.equal(hc.deterministic(la, got_keep), _deterministic_loop(la, want_keep))


def test_deterministic_values_are_soft_scores_and_ties_stable():
    la = torch.zeros(2, 4)  # all tied
    m = hc.deterministic(la, 2)
    # stable tie-break: lower indices kept
    assert (m != 0).tolist() == [[True, True, False, False]] * 2
    assert float(m[0, 0]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="n_keep"):
        hc.deterministic(la, 5)
