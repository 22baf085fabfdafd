import torch
from torch import nn

from model.layers import BatchNormSwish, DownSkip, SqueezeExcite, UpSkip, WNConv2d


def _saved_bytes(fn):
    """Bytes of tensors autograd keeps for backward while running fn (a deterministic memory measure)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def _pair(c=6):
    torch.manual_seed(0)
    fused, plain = BatchNormSwish(c, fused=True), BatchNormSwish(c, fused=False)
    with torch.no_grad():
        fused.weight.uniform_(0.5, 1.5)
        fused.bias.uniform_(-0.5, 0.5)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def test_fused_bn_swish_matches_unfused_values_gradients_and_running_stats():
    fused, plain = _pair()
    x = torch.randn(4, 6, 5, 5, dtype=torch.float32) * 3 + 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(4, 6, 5, 5)
    ya, yb = fused(xa), plain(xb)
    assert torch.allclose(ya, yb, atol=1e-5)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-5)
    assert torch.allclose(fused.weight.grad, plain.weight.grad, atol=1e-4)
    assert torch.allclose(fused.bias.grad, plain.bias.grad, atol=1e-4)
    assert torch.allclose(fused.running_mean, plain.running_mean, atol=1e-6)
    assert torch.allclose(fused.running_var, plain.running_var, atol=1e-6)
    assert fused.num_batches_tracked == plain.num_batches_tracked == 1


def test_fused_bn_swish_gradcheck_train_and_eval():
    fused, _ = _pair(3)
    fused.double()
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    fused.momentum = 0.0  # keep running stats fixed across gradcheck's repeated calls
    assert torch.autograd.gradcheck(lambda t: fused(t), (x,))
    fused.eval()
    assert torch.autograd.gradcheck(lambda t: fused(t), (x,))


def test_fused_bn_swish_keeps_one_activation_for_backward():
    fused, plain = _pair(16)
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    activation = x.numel() * 4
    _, fused_bytes = _saved_bytes(lambda: fused(x))
    _, plain_bytes = _saved_bytes(lambda: plain(x))
    assert fused_bytes < 1.1 * activation
    assert plain_bytes >= 2 * activation
    assert fused_bytes < plain_bytes / 1.8


def test_fused_bn_swish_runs_under_bf16_autocast():
    fused, plain = _pair()
    x = torch.randn(4, 6, 5, 5).bfloat16().requires_grad_()
    y = fused(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


def test_weight_norm_sets_each_output_channel_norm_to_g():
    conv = WNConv2d(3, 5, 3, padding=1)
    with torch.no_grad():
        conv.log_g.copy_(torch.log(torch.arange(1.0, 6.0)).view(-1, 1, 1, 1))
        conv.weight.mul_(7.0)  # the direction's scale does not matter
    norms = conv.effective_weight().flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.arange(1.0, 6.0), rtol=1e-4)
    init = WNConv2d(3, 5, 3)
    assert torch.allclose(init.effective_weight(), init.weight, rtol=0.05)  # init: log_g = log(||v|| + 0.01)


def test_conv_without_weight_norm_has_no_extra_parameter():
    conv = WNConv2d(4, 4, 1, bias=False, weight_norm=False)
    assert [n for n, _ in conv.named_parameters()] == ["weight"]


def test_skip_paths_shapes_and_offsets():
    x = torch.randn(2, 8, 6, 6)
    down = DownSkip(8, 16)
    assert down(x).shape == (2, 16, 3, 3)
    assert [c.out_channels for c in down.convs] == [4, 4, 4, 4]
    assert [c.out_channels for c in DownSkip(30, 60).convs] == [15, 15, 15, 15]
    assert [c.out_channels for c in DownSkip(6, 10).convs] == [2, 2, 2, 4]
    up = UpSkip(8)
    assert up(x).shape == (2, 4, 12, 12) and up.conv.bias is None


def test_squeeze_excite_hidden_width_and_gating():
    se = SqueezeExcite(128)
    assert se.fc1.out_features == 8 and SqueezeExcite(32).fc1.out_features == 4
    x = torch.randn(2, 128, 4, 4)
    ratio = se(x) / x
    assert ((ratio > 0) & (ratio < 1)).all()


def test_bn_counts_as_batchnorm_for_readjustment():
    assert isinstance(BatchNormSwish(4), nn.BatchNorm2d)
    assert BatchNormSwish(4).momentum == 0.05 and BatchNormSwish(4).eps == 1e-5
