import math

import pytest
import torch

from model.config import apply_overrides, get_preset
from model.network import NVAE
from model.objective import balanced_kl, kl_balance_alphas, kl_warmup_beta, regularization_lambda
from model.regularizers import SpectralRegularizer, bn_regularization, conv_layers


def test_kl_balancing_alphas_for_mnist():
    assert kl_balance_alphas(get_preset("mnist").groups_per_scale).tolist() == [1.0] * 5 + [2.0] * 10
    assert kl_balance_alphas([16, 8, 4, 4, 4]).tolist()[:4] == [1.0] * 4


def test_kl_warmup_is_linear_over_first_30_percent():
    total = 10_000
    assert kl_warmup_beta(0, total) == 1e-4
    assert kl_warmup_beta(1501, total) == pytest.approx(0.5, abs=1e-3)
    assert kl_warmup_beta(3001, total) == 1.0
    assert kl_warmup_beta(9000, total) == 1.0


def test_balanced_kl_only_while_beta_below_one():
    kl = [torch.tensor([1.0, 3.0]), torch.tensor([10.0, 30.0])]
    alphas = torch.tensor([1.0, 2.0])
    loss, c = balanced_kl(kl, 0.5, alphas)
    raw = torch.tensor([2.01, 20.01]) / alphas
    expected_c = raw / raw.mean()
    assert torch.allclose(c, expected_c)
    assert torch.allclose(loss, 0.5 * (torch.stack(kl, 1) * expected_c).sum(1))
    loss1, c1 = balanced_kl(kl, 1.0, alphas)
    assert torch.equal(c1, torch.ones(2)) and torch.allclose(loss1, torch.tensor([11.0, 33.0]))


def test_balancing_coefficients_are_detached():
    kl = [torch.tensor([1.0], requires_grad=True), torch.tensor([5.0], requires_grad=True)]
    loss, c = balanced_kl(kl, 0.1, torch.ones(2))
    loss.sum().backward()
    assert torch.allclose(kl[0].grad, 0.1 * c[0:1]) and not c.requires_grad


def test_lambda_annealing_log_linear():
    cfg = apply_overrides(get_preset("ffhq256"), {})
    assert regularization_lambda(cfg, 0.0) == pytest.approx(1.0)
    assert regularization_lambda(cfg, 1.0) == pytest.approx(0.1)
    assert regularization_lambda(cfg, 0.5) == pytest.approx(math.sqrt(0.1))
    assert regularization_lambda(get_preset("mnist"), 0.3) == 1e-2


def test_power_iteration_converges_to_spectral_norm(make_tiny):
    torch.manual_seed(0)
    model = NVAE(make_tiny())
    reg = model.spectral
    total = float(model.spectral_loss().detach())  # first call: 40 iterations
    for _ in range(5):
        total = float(model.spectral_loss().detach())  # 4 more each, starting from the stored u, v
    estimates = reg.singular_values(model)
    exact = 0.0
    for name, conv in conv_layers(model):
        w = conv.effective_weight().detach().reshape(conv.out_channels, -1)
        sigma = float(torch.linalg.matrix_norm(w, 2))
        exact += sigma
        assert estimates[name] == pytest.approx(sigma, rel=0.01), name
    assert total == pytest.approx(exact, rel=0.01)


def test_spectral_vectors_persist_in_state_dict(make_tiny):
    model = NVAE(make_tiny())
    keys = [k for k in model.state_dict() if k.startswith("spectral.")]
    assert "spectral.initialized" in keys and any(k.startswith("spectral.u_") for k in keys)
    model.spectral_loss()
    state = model.state_dict()
    other = NVAE(make_tiny())
    assert not bool(other.spectral.initialized)
    other.load_state_dict(state)
    assert bool(other.spectral.initialized)
    assert torch.equal(other.spectral.u_0, model.spectral.u_0)


def test_first_call_uses_more_iterations():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 3)
    holder = torch.nn.Sequential(conv)
    reg = SpectralRegularizer(holder, iters=1, iters_first=40)
    first = float(reg(holder))
    exact = float(torch.linalg.matrix_norm(conv.weight.detach().reshape(16, -1), 2))
    assert first == pytest.approx(exact, rel=0.01)


def test_spectral_term_is_the_same_for_a_channels_last_model(make_tiny):
    """A channels-last weight is iterated in its memory order (columns permuted): the term, its gradients and
    the stored singular vectors (kept in the (C_in, k, k) column order) equal those of a contiguous model."""
    import copy

    torch.manual_seed(0)
    plain = NVAE(make_tiny()).double()
    last = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    assert any(not m.weight.is_contiguous() for _, m in conv_layers(last))  # the permuted path runs
    for _ in range(2):  # the first call (40 iterations), then one from the stored u, v
        for m in (plain, last):
            m.zero_grad()
            m.spectral_loss().backward()
        torch.testing.assert_close(
            float(plain.spectral.singular_values(plain)["stem"]),
            float(last.spectral.singular_values(last)["stem"]),
        )
    for (name, a), b in zip(plain.named_parameters(), last.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), b in zip(plain.spectral.named_buffers(), last.spectral.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_spectral_loss_has_gradient_towards_smaller_sigma(make_tiny):
    model = NVAE(make_tiny())
    model.spectral_loss().backward()
    assert model.stem.log_g.grad is not None and (model.stem.log_g.grad > 0).any()


def test_bn_regularization_is_sum_of_max_abs_gamma():
    net = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
        net[2].weight.copy_(torch.tensor([0.1, 0.3]))
    assert float(bn_regularization(net)) == pytest.approx(2.3)


def test_bilinear_form_value_and_gradient_match_autograd():
    from model.regularizers import _BilinearForm

    torch.manual_seed(0)
    w = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    u, v = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)
    ref = torch.einsum("lr,lrc,lc->l", u, w, v)
    torch.testing.assert_close(_BilinearForm.apply(w, u, v), ref)
    assert torch.autograd.gradcheck(lambda w: _BilinearForm.apply(w, u, v), (w,))
