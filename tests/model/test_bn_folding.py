"""Eval-mode BN folded into the neighbouring convolutions (`FusedSequential._folded_forward`): the same
function as the plain chain up to float rounding, in each layout and precision it runs in, and off wherever a
BN normalises by batch statistics (training, BN readjustment)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.cells import DecoderCell, EncoderCell
from model.layers import BatchNormSwish, WNConv2d, bn_folding


def _randomise(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
            m.running_var.copy_(0.2 + torch.rand(c, generator=g))
            m.weight.data.copy_(1 + 0.3 * torch.randn(c, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(c, generator=g))
        if isinstance(m, WNConv2d) and m.bias is not None:
            m.bias.data.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return module.eval()


def _both(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        with bn_folding(False):
            plain = module(x)
        with bn_folding(True):
            folded = module(x)
    return plain, folded


CELLS = {
    "encoder": lambda: EncoderCell(8, 8),
    "encoder-down": lambda: EncoderCell(8, 16, down=True),
    "decoder": lambda: DecoderCell(8, 8, expansion=3),
    "decoder-up": lambda: DecoderCell(16, 8, expansion=3, up=True),
}


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_folded_cells_equal_the_plain_chain_in_float32(cell: str, layout) -> None:
    torch.manual_seed(0)
    module = _randomise(CELLS[cell](), 1).to(memory_format=layout)
    c = 16 if cell == "decoder-up" else 8
    x = torch.randn(4, c, 8, 8).contiguous(memory_format=layout)
    plain, folded = _both(module, x)
    assert plain.shape == folded.shape
    torch.testing.assert_close(folded, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", ["encoder", "decoder"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_folded_cells_under_low_precision_autocast_stay_within_its_rounding(cell: str, dtype) -> None:
    torch.manual_seed(0)
    module = _randomise(CELLS[cell](), 2)
    x = torch.randn(4, 8, 8, 8)
    with torch.no_grad():
        exact = module.double()(x.double()).float()
    module.float()
    with torch.autocast("cpu", dtype=dtype):
        plain, folded = _both(module, x)
    err_plain = (plain.float() - exact).abs().max()
    err_folded = (folded.float() - exact).abs().max()
    assert folded.dtype == plain.dtype
    assert err_folded <= 2 * err_plain + 1e-3, (err_folded, err_plain)


def test_batch_statistics_are_never_folded() -> None:
    """BN readjustment runs the BNs in training mode without gradients: batch statistics, running stats updated,
    exactly as the plain chain."""
    torch.manual_seed(0)
    cell = _randomise(DecoderCell(8, 8, expansion=3), 3)
    twin = _randomise(DecoderCell(8, 8, expansion=3), 3)
    twin.load_state_dict(cell.state_dict())
    for m in (cell, twin):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.train()
    x = torch.randn(6, 8, 8, 8)
    with torch.no_grad():
        with bn_folding(True):
            a = cell(x)
        with bn_folding(False):
            b = twin(x)
    assert torch.equal(a, b)
    bn_a = [m for m in cell.modules() if isinstance(m, BatchNormSwish)][0]
    bn_b = [m for m in twin.modules() if isinstance(m, BatchNormSwish)][0]
    assert torch.equal(bn_a.running_mean, bn_b.running_mean) and int(bn_a.num_batches_tracked) == 1


def test_with_gradients_the_chain_is_unfolded() -> None:
    cell = _randomise(EncoderCell(8, 8), 4)
    x = torch.randn(2, 8, 8, 8, requires_grad=True)
    with bn_folding(True):
        y = cell(x)
    y.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in cell.parameters() if p.requires_grad)


def test_a_trained_models_log_likelihood_stays_within_float32s_own_error(fmnist64, make_tiny) -> None:
    """A tiny model trained on Fashion-MNIST (40 steps; its BN statistics its own), per-image ELBO on the test
    images with the same noise. Float32 itself moves these by a few 1e-6 against exact (float64) arithmetic;
    folding moves them no further: its error against float64 is within the plain chain's own, and the typical
    image moves by under 1e-6 relative."""
    from data.loaders import make_loader
    from model.network import NVAE
    from training.train import Objective, learning_rate, make_optimizer, training_step

    torch.manual_seed(0)
    cfg = make_tiny(data_size=28, image_size=32)
    net = NVAE(cfg)
    objective, opt = Objective(net), make_optimizer(cfg, net)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    epochs = (make_loader(fmnist64, "train", 16, train=True, binarize=True, epoch=e) for e in range(10))
    batches = (x for loader in epochs for x in loader)
    for step in range(40):
        training_step(objective, opt, scaler, batches, step, 40, learning_rate(cfg, step, 40, 4))
    net.eval()
    (x,) = list(make_loader(fmnist64, "test", 64, train=False, binarize=True))
    g = torch.Generator().manual_seed(5)
    eps = [torch.randn((x.size(0), *shape), generator=g) for shape in net.latent_shapes()]

    def elbo(model, inputs, noise):
        with torch.no_grad():
            out = model(inputs, eps=noise)
            return (-model.reconstruction_nll(out.logits, inputs) + out.log_p - out.log_q).double()

    results = {}
    for fold in (False, True):
        with bn_folding(fold):
            results[fold] = elbo(net, x, eps)
    with bn_folding(False):
        exact = elbo(net.double(), x.double(), [e.double() for e in eps])
    plain, folded = results[False], results[True]
    assert torch.isfinite(plain).all()
    moved = (folded - plain).abs() / plain.abs()
    err_plain, err_folded = ((r - exact).abs() / exact.abs() for r in (plain, folded))
    assert err_folded.max() <= 2 * err_plain.max(), (float(err_folded.max()), float(err_plain.max()))
    assert moved.median() <= 1e-6 and moved.max() <= 2e-5, (float(moved.median()), float(moved.max()))
