import math

import pytest
import torch

from common.errors import ConfigError
from model.distributions import Bernoulli, DiscretizedLogisticMixture, Normal, soft_clamp


def test_normal_soft_clamps_and_sigma_floor():
    n = Normal(torch.tensor([100.0, -100.0, 0.0]), torch.tensor([-100.0, 100.0, 0.0]))
    assert torch.allclose(n.mu, torch.tensor([5.0, -5.0, 0.0]), atol=1e-4)
    assert torch.allclose(n.sigma, torch.tensor([math.exp(-5) + 0.01, math.exp(5) + 0.01, 1.01]), rtol=1e-4)


def test_temperature_multiplies_sigma_floor_included():
    mu, ls = torch.randn(10), torch.randn(10)
    assert torch.allclose(Normal(mu, ls, 0.6).sigma, 0.6 * Normal(mu, ls).sigma)


def test_residual_posterior_matches_eq2():
    """q = N(mu_p + dmu, logsig_p + dlogsig): raw heads added first, then soft-clamped."""
    mu_p, ls_p, dmu, dls = (torch.randn(1000) * 4 for _ in range(4))
    q = Normal.residual(mu_p, ls_p, dmu, dls)
    assert torch.allclose(q.mu, 5 * torch.tanh((mu_p + dmu) / 5))
    assert torch.allclose(q.sigma, torch.exp(5 * torch.tanh((ls_p + dls) / 5)) + 0.01)
    # not the same as adding the already-clamped parameters
    assert not torch.allclose(q.mu, soft_clamp(mu_p) + soft_clamp(dmu))


def test_analytic_kl_matches_monte_carlo():
    torch.manual_seed(0)
    q = Normal(torch.randn(6), torch.randn(6) * 0.5)
    p = Normal(torch.randn(6), torch.randn(6) * 0.5)
    z = q.sample(torch.randn(400_000, 6))
    mc = (q.log_p(z) - p.log_p(z)).mean(0)
    assert torch.allclose(q.kl(p), mc, atol=0.02, rtol=0.02)


def test_log_p_is_the_normal_density():
    q = Normal(torch.tensor([0.3]), torch.tensor([-0.2]))
    ref = torch.distributions.Normal(q.mu, q.sigma)
    z = torch.linspace(-3, 3, 11)
    assert torch.allclose(q.log_p(z), ref.log_prob(z), atol=1e-6)


def _all_levels(channels, bits):
    levels = torch.arange(2**bits, dtype=torch.float32) / (2**bits - 1)
    grids = torch.meshgrid(*[levels] * channels, indexing="ij")
    return torch.stack([g.flatten() for g in grids], dim=1)  # (L**C, C)


def _mass(channels, bits, edge, num_mix=3, seed=0):
    """Total probability of every possible pixel value, for a few random parameter settings."""
    torch.manual_seed(seed)
    values = _all_levels(channels, bits)  # (N, C)
    n = values.size(0)
    n_params = num_mix * (1 + 2 * channels + channels * (channels - 1) // 2)
    params = torch.randn(4, n_params, 1, 1) * 0.5
    params[:, num_mix + channels * num_mix : num_mix + 2 * channels * num_mix] -= 1.5  # moderate scales
    totals = []
    for b in range(4):
        p = params[b : b + 1].expand(n, -1, -1, -1)
        d = DiscretizedLogisticMixture(p, channels, num_mix, bits, edge)
        totals.append(torch.logsumexp(d.log_prob(values[:, :, None, None]).flatten().double(), 0).exp())
    return torch.stack(totals)


@pytest.mark.parametrize("channels, bits", [(1, 8), (1, 5), (3, 5)])
def test_dmol_sums_to_one_over_all_pixel_values(channels, bits):
    assert torch.allclose(_mass(channels, bits, "correct"), torch.ones(4, dtype=torch.float64), atol=2e-3)


def test_released_edge_gives_more_than_one_at_8_bits():
    """The released x > 0.99 test gives level 254 the upper tail too: total mass exceeds 1."""
    assert (_mass(1, 8, "released") > 1.001).all()
    # at 5 bits the released threshold is already correct
    assert torch.allclose(_mass(1, 5, "released"), _mass(1, 5, "correct"))


def test_dmol_sample_in_range_and_mean_shape():
    params = torch.randn(2, 10 * 10, 4, 4)
    d = DiscretizedLogisticMixture(params, 3, 10, 8)
    s = d.sample(0.8, torch.Generator().manual_seed(1))
    assert s.shape == (2, 3, 4, 4) and s.min() >= 0 and s.max() <= 1
    assert torch.equal(s, d.sample(0.8, torch.Generator().manual_seed(1)))
    assert d.mean().shape == (2, 3, 4, 4)


def test_dmol_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="needs 100 channels"):
        DiscretizedLogisticMixture(torch.randn(1, 30, 2, 2), 3, 10, 8)


def test_dmol_rejects_an_unknown_edge_as_a_config_error():
    with pytest.raises(ConfigError, match="edge must be 'correct' or 'released', got 'upper'"):
        DiscretizedLogisticMixture(torch.randn(1, 100, 2, 2), 3, 10, 8, edge="upper")


def test_bernoulli_sums_to_one():
    logits = torch.randn(1, 1, 3, 3)
    b = Bernoulli(logits)
    total = b.log_prob(torch.zeros(1, 1, 3, 3)).exp() + b.log_prob(torch.ones(1, 1, 3, 3)).exp()
    assert torch.allclose(total, torch.ones_like(total))
    assert b.sample(generator=torch.Generator().manual_seed(0)).unique().tolist() in (
        [0.0, 1.0],
        [0.0],
        [1.0],
    )
