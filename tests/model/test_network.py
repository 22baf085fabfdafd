import pytest
import torch

from model.config import PRESETS, apply_overrides, get_preset
from model.info import build_on_meta, model_info
from model.network import NVAE
from model.objective import kl_balance_alphas, nvae_loss
from model.precision import autocast
from model.regularizers import bn_layers, conv_layers


@pytest.mark.parametrize(
    "preset, params, convs, bns",
    [("mnist", 33_363_134, 255, 214), ("cifar10", 130_852_480, 610, 364)],
)
def test_parameter_parity_with_released_recipe(preset, params, convs, bns):
    model = build_on_meta(get_preset(preset))
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(conv_layers(model)) == convs
    assert len(bn_layers(model)) == bns


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_builds_with_its_group_layout(preset):
    cfg = get_preset(preset)
    model = build_on_meta(cfg)
    expected = [g for g in reversed(cfg.groups_per_scale)]
    shapes = model.latent_shapes()
    assert len(shapes) == sum(expected) == len(model.enc_sampler) == len(model.dec_combiners)
    assert len(model.dec_sampler) == len(shapes) - 1
    assert all(len(f) == cfg.num_nf for f in model.flows)
    # coarsest latent side = image / 2**(pre_blocks + scales - 1), doubling per scale
    side = cfg.image_size // 2 ** (cfg.pre_blocks + cfg.num_scales - 1)
    k = 0
    for s, n in enumerate(expected):
        for _ in range(n):
            assert shapes[k] == (cfg.z_channels, side * 2**s, side * 2**s)
            k += 1


def test_mnist_forward_cost_matches_measured_reference():
    info = model_info(get_preset("mnist"))
    assert info["forward_gflop_per_image"] == pytest.approx(2.53, rel=0.01)


def _step_loss(cfg, precision, seed=0):
    torch.manual_seed(seed)
    model = NVAE(cfg)
    x = torch.rand(4, cfg.in_channels, cfg.data_size, cfg.data_size)
    if cfg.likelihood == "bernoulli":
        x = (x > 0.5).float()
    with autocast("cpu", precision):
        terms = nvae_loss(model, x, 0, 100, kl_balance_alphas(cfg.groups_per_scale))
    terms.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return float(terms.loss.detach())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(
    "overrides",
    [{}, {"likelihood": "bernoulli", "binarize": True, "num_nf": 0}, {"in_channels": 3, "num_bits": 5}],
    ids=["dmol-gray-flows", "bernoulli", "dmol-rgb-5bit"],
)
def test_small_models_train_forward_backward(precision, overrides, make_tiny):
    loss = _step_loss(make_tiny(**overrides), precision)
    assert loss == loss  # finite (not NaN)


@pytest.mark.parametrize("preset", ["fmnist-cpu"])
def test_small_preset_fp32_and_bf16(preset):
    cfg = get_preset(preset)
    l32, l16 = _step_loss(cfg, "fp32"), _step_loss(cfg, "bf16")
    assert abs(l32 - l16) / abs(l32) < 0.02


def test_same_seed_gives_identical_losses(tiny_cfg):
    cfg = tiny_cfg
    assert _step_loss(cfg, "fp32", seed=3) == _step_loss(cfg, "fp32", seed=3)
    assert _step_loss(cfg, "fp32", seed=3) != _step_loss(cfg, "fp32", seed=4)


def test_decoder_input_h_and_padding(tiny_cfg):
    model = NVAE(tiny_cfg)
    side = tiny_cfg.image_size // tiny_cfg.total_downsample
    assert model.h.shape == (
        tiny_cfg.channels * 2 ** (tiny_cfg.pre_blocks + tiny_cfg.num_scales - 1),
        side,
        side,
    )
    assert 0 <= float(model.h.min()) and float(model.h.max()) < 1
    out = model(torch.rand(2, 1, 12, 12))
    assert out.logits.shape == (2, tiny_cfg.output_channels, 16, 16)
    assert len(out.kl_all) == model.num_groups and out.kl_all[0].shape == (2,)
    assert out.kl_diag[0].shape == (tiny_cfg.z_channels,)


def test_reconstruction_ignores_padding(tiny_cfg):
    """The NLL is over the data-sized crop: changing padded-border logits leaves it unchanged."""
    model = NVAE(tiny_cfg)
    x = torch.rand(2, 1, 12, 12)
    logits = torch.randn(2, tiny_cfg.output_channels, 16, 16)
    base = model.reconstruction_nll(logits, x)
    logits[..., 0, :] += 5.0
    assert torch.allclose(model.reconstruction_nll(logits, x), base)
    logits[..., 5, 5] += 5.0
    assert not torch.allclose(model.reconstruction_nll(logits, x), base)


def test_prior_sampling_uses_temperature_and_noise(tiny_cfg):
    model = NVAE(tiny_cfg).eval()
    eps = [torch.randn(3, *s) for s in model.latent_shapes()]
    a = model.sample_logits(3, 0.7, eps=eps)
    b = model.sample_logits(3, 0.7, eps=eps)
    c = model.sample_logits(3, 1.0, eps=eps)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    zero = [torch.zeros_like(e) for e in eps]
    assert torch.allclose(model.sample_logits(3, 0.7, eps=zero), model.sample_logits(3, 1.0, eps=zero))


def test_residual_posterior_can_be_switched_off(tiny_cfg):
    torch.manual_seed(0)
    a = NVAE(tiny_cfg)
    torch.manual_seed(0)
    b = NVAE(apply_overrides(tiny_cfg, {"res_dist": False}))
    x = torch.rand(2, 1, 12, 12)
    torch.manual_seed(1)
    ka = a(x).kl_all[1]
    torch.manual_seed(1)
    kb = b(x).kl_all[1]
    assert not torch.allclose(ka, kb)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_autocast_forward_backward(precision, make_tiny):
    cfg = make_tiny()
    model = NVAE(cfg).cuda()
    x = torch.rand(4, 1, cfg.data_size, cfg.data_size, device="cuda")
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0, enabled=precision == "fp16")
    with autocast("cuda", precision):
        terms = nvae_loss(model, x, 0, 100, kl_balance_alphas(cfg.groups_per_scale).cuda())
    scaler.scale(terms.loss).backward()
    assert torch.isfinite(terms.loss.detach())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
