import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.fused import _DepthwiseConv
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


@pytest.mark.parametrize("side", [6, 32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_down_skip_is_the_four_stride_2_convs(side: int, channels_last: bool) -> None:
    """Subsampled stride-1 convs compute the factorized reduce: the same outputs and gradients, to float32
    rounding, as 1x1 stride-2 convs on the shifted maps."""
    torch.manual_seed(0)
    down = DownSkip(24, 32)
    x = torch.randn(3, 24, side, side)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = down(x)
    y.square().sum().backward()
    grads = [x.grad, *(p.grad for p in down.parameters())]
    x_ref = x.detach().clone().requires_grad_()
    a = F.silu(x_ref)
    shifted = (a, a[:, :, 1:, 1:], a[:, :, :, 1:], a[:, :, 1:, :])
    weights = [(c.effective_weight(), c.bias) for c in down.convs]
    for c in down.convs:
        c.zero_grad()
    ref = torch.cat([F.conv2d(s, w, b, stride=2) for s, (w, b) in zip(shifted, weights, strict=True)], 1)
    ref.square().sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, [x_ref.grad, *(p.grad for p in down.parameters())], strict=True):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()  # relative to the gradient's scale


def test_down_skip_trains_on_few_channels_at_64_pixels_channels_last() -> None:
    """Eight channels at 64x64, channels-last: oneDNN's AVX-512 stride-2 1x1 weight gradient corrupts the heap
    there (a crash of the whole process); the subsampled convs do not reach that kernel."""
    down = DownSkip(8, 8)
    x = torch.randn(2, 8, 64, 64).contiguous(memory_format=torch.channels_last).requires_grad_()
    for _ in range(3):
        down(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_squeeze_excite_hidden_width_and_gating():
    se = SqueezeExcite(128)
    assert se.fc1.out_features == 8 and SqueezeExcite(32).fc1.out_features == 4
    x = torch.randn(2, 128, 4, 4)
    ratio = se(x) / x
    assert ((ratio > 0) & (ratio < 1)).all()


def test_bn_counts_as_batchnorm_for_readjustment():
    assert isinstance(BatchNormSwish(4), nn.BatchNorm2d)
    assert BatchNormSwish(4).momentum == 0.05 and BatchNormSwish(4).eps == 1e-5


def _depthwise(channels: int) -> WNConv2d:
    return WNConv2d(channels, channels, 5, padding=2, groups=channels, bias=False, weight_norm=False)


def test_depthwise_small_map_backward_matches_conv2d_autograd_in_both_layouts():
    torch.manual_seed(0)
    conv = _depthwise(12).double()
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(3, 12, 4, 4, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
        assert conv._fast_depthwise(x)
        y = conv(x)
        g = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (x, conv.weight), g)
        ref = torch.nn.functional.conv2d(x, conv.weight, None, 1, 2, 1, 12)
        rx, rw = torch.autograd.grad(ref, (x, conv.weight), g)
        torch.testing.assert_close(y, ref)
        torch.testing.assert_close(gx, rx)
        torch.testing.assert_close(gw, rw)
    x = torch.randn(2, 12, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, w: _DepthwiseConv.apply(x, w, 2), (x, conv.weight))


def test_depthwise_fast_path_only_where_it_applies():
    conv = _depthwise(8)
    small, large = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 8, 8)
    assert conv._fast_depthwise(small)
    assert conv._fast_depthwise(large)  # grad-input by the forward kernel is faster at every size
    with torch.no_grad():
        assert not conv._fast_depthwise(small)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not conv._fast_depthwise(small)
    assert not WNConv2d(8, 8, 5, padding=2, groups=8, bias=True, weight_norm=False)._fast_depthwise(small)


def test_shared_effective_weights_normalises_once_and_sums_both_gradients():
    from model.layers import shared_effective_weights

    torch.manual_seed(0)
    conv = WNConv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 5, 5)

    def loss():
        return conv(x).square().mean() + conv.effective_weight().abs().sum()

    ref = torch.autograd.grad(loss(), (conv.weight, conv.log_g))
    with shared_effective_weights(conv):
        first = conv.effective_weight()
        assert conv.effective_weight() is first
        shared = torch.autograd.grad(loss(), (conv.weight, conv.log_g))
    assert conv._weight_cache is None and conv.effective_weight() is not first
    for a, b in zip(ref, shared, strict=True):
        torch.testing.assert_close(a, b)


def _bn_conv_chains(conv_kwargs, c=6, dtype=torch.float64):
    """A FusedSequential (BN-Swish, conv) and an identical plain nn.Sequential."""
    from model.layers import FusedSequential

    torch.manual_seed(0)
    fused = FusedSequential(BatchNormSwish(c), WNConv2d(c, **conv_kwargs)).to(dtype)
    with torch.no_grad():
        fused[0].weight.uniform_(0.5, 1.5)
        fused[0].bias.uniform_(-0.5, 0.5)
    plain = nn.Sequential(BatchNormSwish(c, fused=False), WNConv2d(c, **conv_kwargs)).to(dtype)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _assert_same_values_and_gradients(fused, plain, x, msg):
    """fused(x) equals plain(x), and so do the gradients of x and of every parameter; returns fused(x)."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fused(xa), plain(xb)
    torch.testing.assert_close(ya, yb)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    for (name, pa), pb in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad, msg=f"{msg} {name}")
    return ya


CONV_CASES = [
    {"c_out": 8, "kernel_size": 3, "stride": 2, "padding": 1},  # encoder down cell conv (weight norm, bias)
    {"c_out": 6, "kernel_size": 5, "padding": 2, "groups": 6, "bias": False, "weight_norm": False},  # dw, 4x4
    {"c_out": 9, "kernel_size": 1, "bias": False, "weight_norm": False},
]


def test_bn_swish_conv_block_matches_the_plain_chain_in_both_layouts():
    for kwargs in CONV_CASES:
        for layout in (torch.contiguous_format, torch.channels_last):
            fused, plain = _bn_conv_chains(kwargs)
            x = (torch.randn(3, 6, 4, 4, dtype=torch.float64) * 2 + 1).contiguous(memory_format=layout)
            _assert_same_values_and_gradients(fused, plain, x, f"{kwargs} {layout}")
            torch.testing.assert_close(fused[0].running_var, plain[0].running_var)
            assert fused[0].num_batches_tracked == plain[0].num_batches_tracked == 1


def test_bn_swish_conv_block_gradcheck_and_eval_mode():
    fused, _ = _bn_conv_chains(CONV_CASES[0], c=3)
    fused[0].momentum = 0.0
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fused(t), (x,))
    fused.eval()
    assert torch.autograd.gradcheck(lambda t: fused(t), (x,))


def test_bn_swish_conv_block_keeps_only_its_input_for_backward():
    fused, plain = _bn_conv_chains({"c_out": 16, "kernel_size": 1, "bias": False, "weight_norm": False}, 16)
    fused.float(), plain.float()
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    activation = x.numel() * 4
    _, fused_bytes = _saved_bytes(lambda: fused(x))
    _, plain_bytes = _saved_bytes(lambda: plain(x))
    assert fused_bytes < 1.1 * activation
    assert plain_bytes >= 3 * activation  # BN input, Swish input, conv input


def test_bn_swish_conv_block_under_bf16_autocast_matches_autocast_chain():
    fused, plain = _bn_conv_chains(CONV_CASES[0], dtype=torch.float32)
    x = torch.randn(3, 6, 8, 8)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = fused(xa), plain(xb)
    assert ya.dtype == yb.dtype == torch.bfloat16
    torch.testing.assert_close(ya, yb)
    ya.float().sum().backward()
    yb.float().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fused[1].weight.grad, plain[1].weight.grad, atol=5e-2, rtol=5e-2)
    assert fused[1].weight.grad.dtype == torch.float32


def test_the_cpu_elu_equals_pytorchs_in_value_and_gradient():
    import torch.nn.functional as F

    from model.fused import elu

    torch.manual_seed(0)
    x = (torch.randn(8, 16, 9, 9) * 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn_like(x)
    ours, ref = elu(x), F.elu(x)
    assert torch.allclose(ours, ref, rtol=0, atol=1e-7)
    assert torch.equal(ours[x > 0], x[x > 0])  # positive inputs pass exactly
    (d_ours,) = torch.autograd.grad(ours, x, g)
    (d_ref,) = torch.autograd.grad(ref, x, g)
    assert torch.allclose(d_ours, d_ref, rtol=1e-6, atol=1e-7)
    x64 = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(elu, (x64,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_the_cpu_elu_matches_pytorchs_in_each_precision_and_layout(dtype, layout):
    """Under autocast a conv hands ELU bf16 (or fp16) maps: the fast ELU must round as F.elu does, not lose the
    small negative values to cancellation, and keep the layout."""
    import torch.nn.functional as F

    from model.fused import elu

    torch.manual_seed(0)
    base = torch.cat([torch.randn(2, 8, 6, 6) * 3, -torch.logspace(-4, 0, 576).reshape(2, 8, 6, 6)])
    x = base.to(dtype).contiguous(memory_format=layout).requires_grad_()
    g = torch.randn(x.shape).to(dtype)
    ours, ref = elu(x), F.elu(x)
    assert ours.dtype == dtype and ours.is_contiguous(memory_format=layout)
    ulp = {torch.float32: 1e-7, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    # Within one rounding of the exact value, relative, where F.elu is too (x = -1e-4 included).
    exact = F.elu(x.detach().double())
    assert ((ours.double() - exact).abs() <= ulp * exact.abs() + 1e-7).all()
    assert ((ref.double() - exact).abs() <= ulp * exact.abs() + 1e-7).all()
    (d_ours,) = torch.autograd.grad(ours, x, g)
    (d_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(d_ours, d_ref, rtol=2 * ulp, atol=1e-7)
    # The same through autocast, from a float32 conv's low-precision output (where it sits in the model).
    if dtype is not torch.float32:
        conv = torch.nn.Conv2d(8, 8, 3, padding=1).to(memory_format=layout)
        with torch.autocast("cpu", dtype=dtype):
            h = conv(base[:2].contiguous(memory_format=layout))
            assert h.dtype == dtype
            torch.testing.assert_close(elu(h), F.elu(h), rtol=ulp, atol=1e-7)


def _onednn_dw_grad_weight(x, g, k, p):
    w = torch.zeros(x.size(1), 1, k, k, dtype=x.dtype)
    mask = [False, True, False]
    return torch.ops.aten.convolution_backward(
        g, x, w, None, [1, 1], [p, p], [1, 1], False, [0, 0], x.size(1), mask
    )[1]


def test_depthwise_weight_gradient_forms_match_onednn():
    from model import kernels

    torch.manual_seed(0)
    for shape in ((2, 8, 4, 4), (3, 6, 9, 9)):
        x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        g = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        ref = _onednn_dw_grad_weight(x, g, 5, 2)
        torch.testing.assert_close(kernels.dw_grad_weight_by_shift(x, g, 5, 2), ref)
        torch.testing.assert_close(kernels.dw_grad_weight_per_image(x, g, 5, 2), ref)


def test_compiled_depthwise_weight_gradient_matches_onednn(monkeypatch):
    """The compiled kernels (inductor, C++) against oneDNN, once per form; needs a C++ compiler."""
    import pytest

    from model import kernels

    kernels.reset()
    if not kernels.enabled():
        pytest.skip("no C++ compiler: compiled kernels are off here")
    monkeypatch.setattr(kernels, "MIN_NUMEL", 0)
    torch.manual_seed(0)
    for shape in ((2, 8, 4, 4), (2, 8, 12, 12)):  # by shift (<= 64 pixels), per image
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        g = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        out = kernels.dw_grad_weight(x, g, 5, 2)
        assert out is not None
        torch.testing.assert_close(out, _onednn_dw_grad_weight(x, g, 5, 2), rtol=1e-5, atol=1e-5)
    assert sorted(key[0] for key in kernels._compiled) == [
        "dw_grad_weight_by_shift",
        "dw_grad_weight_per_image",
    ]
    assert (
        kernels.dw_grad_weight(torch.randn(2, 8, 4, 4, dtype=torch.float64), g, 5, 2) is None
    )  # float32 only
    kernels.reset()


def test_compiled_kernels_fall_back_when_compilation_fails(monkeypatch, caplog):
    from model import kernels

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler here")

        return run

    kernels.reset()
    monkeypatch.setattr(kernels, "MIN_NUMEL", 0)
    monkeypatch.setattr(kernels, "enabled", lambda: kernels._state["available"] is not False)
    monkeypatch.setattr(torch, "compile", broken)
    torch.manual_seed(0)
    conv = _depthwise(8)
    x = torch.randn(2, 8, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    with caplog.at_level("WARNING", logger="model.kernels"):
        gx, gw = torch.autograd.grad(conv(x).square().sum(), (x, conv.weight))
    assert "compiled CPU kernels are off" in caplog.text and kernels._state["available"] is False
    ref = torch.nn.functional.conv2d(x, conv.weight, None, 1, 2, 1, 8)
    rx, rw = torch.autograd.grad(ref.square().sum(), (x, conv.weight))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)
    kernels.reset()


def test_compiled_kernels_can_be_switched_off(monkeypatch):
    from model import kernels

    kernels.reset()
    monkeypatch.setenv("NVAE_COMPILED_KERNELS", "0")
    monkeypatch.setattr(kernels, "MIN_NUMEL", 0)
    x = torch.randn(2, 8, 4, 4)
    assert not kernels.enabled() and kernels.dw_grad_weight(x, x, 5, 2) is None
    kernels.reset()


def _two_block_chains(c=6, dtype=torch.float64, weight_norm=False):
    """A FusedSequential of two BN-Swish-conv blocks (depthwise first, as in a decoder cell) and the plain chain."""
    from model.layers import FusedSequential

    def modules(fused):
        return [
            BatchNormSwish(c, fused),
            WNConv2d(c, c, 5, padding=2, groups=c, bias=False, weight_norm=weight_norm),
            BatchNormSwish(c, fused),
            WNConv2d(c, 4, 1, bias=weight_norm, weight_norm=weight_norm),
        ]

    torch.manual_seed(0)
    fused = FusedSequential(*modules(True)).to(dtype)
    with torch.no_grad():
        for bn in (fused[0], fused[2]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    plain = nn.Sequential(*modules(False)).to(dtype)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def test_two_bn_swish_conv_blocks_match_the_plain_chain():
    for weight_norm in (False, True):
        for layout in (torch.contiguous_format, torch.channels_last):
            for size in (4, 8):  # the small-map and the compiled/oneDNN weight-gradient paths
                fused, plain = _two_block_chains(weight_norm=weight_norm)
                x = (torch.randn(3, 6, size, size, dtype=torch.float64) * 2 + 1).contiguous(
                    memory_format=layout
                )
                y = _assert_same_values_and_gradients(fused, plain, x, f"{layout} {size}")
                assert y.grad_fn.name() == "_TwoBNSwishConvFunctionBackward"
                for (name, ba), bb in zip(fused.named_buffers(), plain.buffers(), strict=True):
                    torch.testing.assert_close(ba, bb, msg=name)


def test_two_bn_swish_conv_blocks_match_the_plain_chain_in_float32_where_the_compiled_kernels_run(monkeypatch):
    """fp64 never reaches the compiled depthwise weight-gradient kernel (float32 only); this does, in both
    layouts, on the small-map path (4x4), oneDNN's (8x8) and the compiled kernel's (from 2**19 elements)."""
    from model import kernels

    compiled = []
    original = kernels.dw_grad_weight

    def counting(*args):
        out = original(*args)
        compiled.append(out is not None)
        return out

    monkeypatch.setattr(kernels, "dw_grad_weight", counting)
    for layout in (torch.contiguous_format, torch.channels_last):
        for batch, c, size in ((4, 16, 4), (4, 16, 8), (8, 64, 32)):
            fused, plain = _two_block_chains(c=c, dtype=torch.float32, weight_norm=True)
            x = (torch.randn(batch, c, size, size) * 2 + 1).contiguous(memory_format=layout)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = fused(xa), plain(xb)
            assert ya.grad_fn.name() == "_TwoBNSwishConvFunctionBackward"
            torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
            g = torch.randn_like(ya)
            (ya * g).sum().backward()
            (yb * g).sum().backward()
            torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
            # Rounding is relative to the block's gradients: log_g's (about 1e-3) come from cancelling sums of
            # the weight's (about 20), and carry its rounding.
            scale = max(p.grad.abs().max().item() for p in plain.parameters())
            for (name, pa), pb in zip(fused.named_parameters(), plain.parameters(), strict=True):
                torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6 * scale, msg=f"{size} {name}")
    assert any(compiled) == kernels.enabled()  # the compiled kernel ran wherever a compiler is


def test_two_bn_swish_conv_blocks_gradcheck_and_memory():
    fused, plain = _two_block_chains(c=3)
    for bn in (fused[0], fused[2]):
        bn.momentum = 0.0
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fused(t), (x,))
    fused.eval()  # running statistics, gradients still recorded: the same function
    assert fused(x).grad_fn.name() == "_TwoBNSwishConvFunctionBackward"
    assert torch.autograd.gradcheck(lambda t: fused(t), (x,))
    fused, plain = _two_block_chains(c=16, dtype=torch.float32)
    x = torch.randn(8, 16, 16, 16, requires_grad=True)
    activation = x.numel() * 4
    _, fused_bytes = _saved_bytes(lambda: fused(x))
    _, pairs_bytes = _saved_bytes(lambda: plain(x))
    assert fused_bytes < 1.1 * activation  # its input only; the plain chain keeps four
    assert pairs_bytes >= 4 * activation


def test_two_block_fusion_stays_off_under_autocast():
    fused, _ = _two_block_chains(dtype=torch.float32)
    x = torch.randn(3, 6, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(x)
    assert y.grad_fn.name() == "_BNSwishConvFunctionBackward"
