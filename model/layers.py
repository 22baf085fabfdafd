"""Building blocks: weight-normed (optionally masked) conv, fused BN+Swish, squeeze-excitation, skip paths."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model import kernels

BN_MOMENTUM = 0.05
BN_EPS = 1e-5


class _FastELU(torch.autograd.Function):
    """ELU (alpha 1) from vectorised kernels, `max(x, 0) + (exp(min(x, 0)) - 1)`: PyTorch's CPU `elu` goes
    through a scalar `expm1` (measured 1.43 ms against 0.15 ms for this on a 16x64x16x16 tensor, AVX-512,
    2 threads). Positive inputs pass exactly; negative ones differ from `expm1` by at most ~6e-8. The gradient
    is ELU's, from the saved output as PyTorch's own (1 for x > 0, y + 1 = exp(x) otherwise), so it keeps one
    tensor per call, as `F.elu` does."""

    @staticmethod
    def forward(ctx, x):
        y = x.clamp(min=0) + (x.clamp(max=0).exp() - 1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (y.clamp(max=0) + 1)


def elu(x: torch.Tensor) -> torch.Tensor:
    """ELU: `_FastELU` on the CPU; PyTorch's `elu` on CUDA (fast there), in ONNX export (one `Elu` node, which
    onnxruntime runs vectorised), under tracing and under torch.compile (which fuses it itself)."""
    if (
        x.device.type != "cpu"
        or torch.onnx.is_in_onnx_export()
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
    ):
        return F.elu(x)
    return _FastELU.apply(x)


class ELU(nn.Module):
    """`nn.ELU()` through `elu` (no state: checkpoints are unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return elu(x)


class WNConv2d(nn.Conv2d):
    """Conv2d with weight normalization `w = exp(log_g) * v / ||v||` per output channel.

    `mask` (a buffer, for autoregressive convs) multiplies `v` before normalization. `log_g` starts at
    `log(||v * mask|| + 0.01) + log(init_scale)`: `init_scale` scales the initial gain only and leaves `v` at
    PyTorch's default init, as the authors' `ELUConv(weight_init_coeff=...)` does (the flows' output conv:
    0.1). Scaling `v` instead would give other initial row norms and a 10x faster-moving direction under
    AdaMax.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool = True,
        weight_norm: bool = True,
        mask: torch.Tensor | None = None,
        init_scale: float = 1.0,
    ):
        super().__init__(c_in, c_out, kernel_size, stride, padding, groups=groups, bias=bias)
        if not init_scale > 0:
            raise ValueError(f"init_scale={init_scale} must be > 0")
        if mask is not None:
            self.register_buffer("mask", mask.to(self.weight.dtype))
        else:
            self.mask = None
        if weight_norm:
            v = self.weight if mask is None else self.weight * self.mask
            norm = v.detach().flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            self.log_g = nn.Parameter(torch.log(norm + 0.01) + math.log(init_scale))
        else:
            self.register_parameter("log_g", None)

    # Set by `shared_effective_weights`: within one training step the normalised weight is computed once and
    # reused by the forward pass and the spectral regularizer (one autograd node, both gradients summed in it).
    _weight_cache: list[torch.Tensor] | None = None

    def effective_weight(self) -> torch.Tensor:
        """The weight the convolution uses: masked and weight-normalised, (C_out, C_in/groups, k, k)."""
        cache = self._weight_cache
        if cache:
            return cache[0]
        w = self._normalised_weight()
        if cache is not None:
            cache.append(w)
        return w

    def _normalised_weight(self) -> torch.Tensor:
        w = self.weight
        if self.mask is not None:
            w = w * self.mask
        if self.log_g is not None:
            # over dims (1, 2, 3) in place of `flatten(1)`: no copy of a channels-last weight, which the norm's
            # backward would also keep (133 MB per `mnist` step)
            norm = torch.linalg.vector_norm(w, dim=(1, 2, 3), keepdim=True)
            w = w * (self.log_g.exp() / (norm + 1e-5))  # per-channel scale first: one weight-sized product
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight()
        if self._fast_depthwise(x):
            return _DepthwiseConv.apply(x, w, self.padding[0])
        return F.conv2d(x, w, self.bias, self.stride, self.padding, 1, self.groups)

    def _fast_depthwise(self, x: torch.Tensor) -> bool:
        c = self.in_channels
        return (
            x.device.type == "cpu"
            and torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
            and self.groups == c == self.out_channels
            and self.bias is None
            and self.stride == (1, 1)
            and self.padding[0] == self.padding[1]
            and self.kernel_size[0] == self.kernel_size[1]
        )


# At or below this many pixels (H*W) per map, a depthwise conv's weight gradient without a compiled kernel
# is computed as k*k shifted products on CPU: oneDNN's backward for small maps is slow (4x4 maps, 1536
# channels: 45 ms against 9 ms on AVX2); from 8x8 up oneDNN's is faster than these products.
DEPTHWISE_SHIFTED_MAX_PIXELS = 16


class _DepthwiseConv(torch.autograd.Function):
    """Depthwise stride-1 convolution with a faster CPU backward (decoder cells' 5x5 conv).

    See `_depthwise_backward`. Same values as `F.conv2d`'s autograd up to float rounding.
    """

    @staticmethod
    def forward(ctx, x, weight, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding = padding
        return F.conv2d(x, weight, None, 1, padding, 1, x.size(1))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x, grad_w = _depthwise_backward(grad_out, x, weight, ctx.padding, ctx.needs_input_grad[:2])
        return grad_x, grad_w, None


def _depthwise_backward(grad_out, x, weight, p: int, needs: tuple[bool, bool]):
    """(grad_x, grad_w) of a depthwise stride-1 conv with padding p.

    grad_x is the convolution of grad_out with the flipped kernel: oneDNN's forward kernel, faster than its
    backward-data one at every decoder shape measured (8x8 maps, 768 channels, channels-last: 0.40 against
    0.98 ms). grad_w[c, i, j] = sum over (b, h, w) of x_pad[b, c, h + i, w + j] * grad_out[b, c, h, w]: from
    a compiled kernel where one applies (`model.kernels`), else k*k broadcast products for small maps and
    oneDNN's weight gradient for larger ones.
    """
    k, c = weight.size(-1), x.size(1)
    grad_out = grad_out.contiguous(memory_format=_memory_format(x))
    grad_x = grad_w = None
    if needs[0]:
        grad_x = F.conv2d(grad_out, weight.flip(2, 3), None, 1, k - 1 - p, 1, c)
    if needs[1]:
        grad_w = kernels.dw_grad_weight(x, grad_out, k, p)
        if grad_w is None and x.size(-1) * x.size(-2) <= DEPTHWISE_SHIFTED_MAX_PIXELS:
            grad_w = kernels.dw_grad_weight_by_shift(x, grad_out, k, p)
        elif grad_w is None:
            grad_w = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [1, 1], [p, p], [1, 1], False, [0, 0], c, [False, True, False]
            )[1]
        grad_w = grad_w.view_as(weight)
    return grad_x, grad_w


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


@contextlib.contextmanager
def shared_effective_weights(model: nn.Module) -> Iterator[None]:
    """Within the block, every `WNConv2d` of `model` normalises its weight once and reuses the result.

    A training step uses each weight twice (the forward pass and the spectral regularizer); sharing the
    normalised weight halves the weight-norm work in forward and backward without changing any value.
    Inference loops (evaluation, BN readjustment, sampling) normalise once for all their passes: without
    gradients the weight norm of `mnist` is ~15 % of a readjust iteration. Parameters must not change inside
    the block. Nested blocks keep the outer one's weights.
    """
    convs = [m for m in model.modules() if isinstance(m, WNConv2d) and m._weight_cache is None]
    for m in convs:
        m._weight_cache = []
    try:
        yield
    finally:
        for m in convs:
            m._weight_cache = None


def _bn_recompute(x, weight, bias, running_mean, running_var, save_mean, save_invstd, training, eps):
    """BN's forward output again, from the statistics the forward pass used (batch or running)."""
    if training:
        mean, var = save_mean, save_invstd.pow(-2) - eps
    else:
        mean, var = running_mean, running_var
    return torch.ops.aten.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps)[0]


def _bn_backward(grad_y, x, weight, running_mean, running_var, save_mean, save_invstd, training, eps):
    return torch.ops.aten.native_batch_norm_backward(
        grad_y,
        x,
        weight,
        running_mean,
        running_var,
        save_mean,
        save_invstd,
        training,
        eps,
        [True, True, True],
    )


class _BNSwishFunction(torch.autograd.Function):
    """swish(batchnorm(x)) that saves only `x` and per-channel statistics, recomputing BN's output in backward.

    The unfused pair keeps two activations alive (BN's input and Swish's input); this keeps one. Forward and
    backward use ATen's native batch-norm and SiLU kernels, so the recomputation costs one cheap pass.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        y, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            x, weight, bias, running_mean, running_var, training, momentum, eps
        )
        ctx.save_for_backward(x, weight, bias, running_mean, running_var, save_mean, save_invstd)
        ctx.training, ctx.eps = training, eps
        return F.silu(y)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, running_mean, running_var, save_mean, save_invstd = ctx.saved_tensors
        bn = (running_mean, running_var, save_mean, save_invstd, ctx.training, ctx.eps)
        y = _bn_recompute(x, weight, bias, *bn)
        grad_y = torch.ops.aten.silu_backward(grad_out, y)
        grad_x, grad_w, grad_b = _bn_backward(grad_y, x, weight, *bn)
        return grad_x, grad_w, grad_b, None, None, None, None, None


def _bn_swish_conv(x, bn_w, bn_b, running_mean, running_var, training, momentum, eps, w, b, conv_args, dtype):
    """conv(swish(batchnorm(x))) and BN's saved statistics; the conv in `dtype` (autocast's) when given."""
    y, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
        x, bn_w, bn_b, running_mean, running_var, training, momentum, eps
    )
    a, wc, bc = _cast(dtype, F.silu(y, inplace=True), w, b)  # y is not needed again
    with torch.autocast(x.device.type, enabled=False) if dtype is not None else contextlib.nullcontext():
        out = F.conv2d(a, wc, bc, conv_args.stride, conv_args.padding, 1, conv_args.groups)
    return out, save_mean, save_invstd


def _bn_swish_conv_backward(grad_out, x, bn_w, bn_b, bn, w, has_bias, conv_args, dtype, recomputed=None):
    """Gradients (x, BN weight, BN bias, conv weight, conv bias) of `_bn_swish_conv` from its input `x`.

    `bn` is (running_mean, running_var, save_mean, save_invstd, training, eps); `recomputed` the pair
    (BN output, Swish output) where the caller already has it, else both are recomputed from `x`.
    """
    if recomputed is None:
        y = _bn_recompute(x, bn_w, bn_b, *bn)
        a = F.silu(y)
    else:
        y, a = recomputed
    a, wc = _cast(dtype, a, w, None)[:2]
    if conv_args.fast_depthwise:
        grad_a, grad_w = _depthwise_backward(grad_out, a, wc, conv_args.padding[0], (True, True))
        grad_b = None
    else:
        grad_a, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out,
            a,
            wc,
            [wc.size(0)] if has_bias else None,
            conv_args.stride,
            conv_args.padding,
            [1, 1],
            False,
            [0, 0],
            conv_args.groups,
            [True, True, has_bias],
        )
    grad_y = torch.ops.aten.silu_backward(grad_a.to(y.dtype), y)
    grad_x, grad_bn_w, grad_bn_b = _bn_backward(grad_y, x, bn_w, *bn)
    grad_w = grad_w.to(w.dtype)
    grad_b = grad_b.to(w.dtype) if grad_b is not None else None
    return grad_x, grad_bn_w, grad_bn_b, grad_w, grad_b


class _BNSwishConvFunction(torch.autograd.Function):
    """conv(swish(batchnorm(x))) that saves only `x`, BN's statistics and the conv weight.

    The conv's input (the Swish output) is recomputed in backward from `x`, so a BN-Swish-conv block keeps one
    activation alive where `_BNSwishFunction` followed by a conv keeps two (the conv saves its input).
    Under autocast the conv runs in the autocast dtype in both passes, as autocast itself would run it.
    """

    @staticmethod
    def forward(ctx, x, bn_w, bn_b, running_mean, running_var, training, momentum, eps, w, b, conv_args):
        dtype = _autocast_dtype(x.device.type)
        out, save_mean, save_invstd = _bn_swish_conv(
            x, bn_w, bn_b, running_mean, running_var, training, momentum, eps, w, b, conv_args, dtype
        )
        ctx.save_for_backward(x, bn_w, bn_b, running_mean, running_var, save_mean, save_invstd, w)
        ctx.training, ctx.eps, ctx.dtype, ctx.conv_args = training, eps, dtype, conv_args
        ctx.has_bias = b is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, bn_w, bn_b, running_mean, running_var, save_mean, save_invstd, w = ctx.saved_tensors
        bn = (running_mean, running_var, save_mean, save_invstd, ctx.training, ctx.eps)
        grad_x, grad_bn_w, grad_bn_b, grad_w, grad_b = _bn_swish_conv_backward(
            grad_out, x, bn_w, bn_b, bn, w, ctx.has_bias, ctx.conv_args, ctx.dtype
        )
        return grad_x, grad_bn_w, grad_bn_b, None, None, None, None, None, grad_w, grad_b, None


class _TwoBNSwishConvFunction(torch.autograd.Function):
    """conv2(swish(bn2(dwconv(swish(bn1(x)))))): two BN-Swish-conv blocks, the first conv depthwise, that keep
    only `x` for backward (fp32; no autocast).

    Two `_BNSwishConvFunction`s keep `x` and the depthwise conv's output; this recomputes that output in
    backward instead, for one depthwise forward (the cheapest conv of a decoder cell: 0.4 ms of `mnist`'s
    8x8 x 768 cells, against 0.9 ms for the 1x1 convs). A decoder cell then keeps one hidden-width activation
    where it kept two (`mnist`: 120 MB less per step).
    """

    @staticmethod
    def forward(ctx, x, bn1_w, bn1_b, rm1, rv1, bn2_w, bn2_b, rm2, rv2, w1, w2, b2, bn1, bn2, args1, args2):
        # bn1, bn2: (training, momentum, eps) of each BN
        d, mean1, invstd1 = _bn_swish_conv(x, bn1_w, bn1_b, rm1, rv1, *bn1, w1, None, args1, None)
        out, mean2, invstd2 = _bn_swish_conv(d, bn2_w, bn2_b, rm2, rv2, *bn2, w2, b2, args2, None)
        ctx.save_for_backward(
            x, bn1_w, bn1_b, rm1, rv1, mean1, invstd1, bn2_w, bn2_b, rm2, rv2, mean2, invstd2, w1, w2
        )
        ctx.bn1, ctx.bn2, ctx.args1, ctx.args2, ctx.has_bias = bn1, bn2, args1, args2, b2 is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, bn1_w, bn1_b, rm1, rv1, mean1, invstd1, bn2_w, bn2_b, rm2, rv2, mean2, invstd2, w1, w2 = (
            ctx.saved_tensors
        )
        bn1 = (rm1, rv1, mean1, invstd1, ctx.bn1[0], ctx.bn1[2])
        bn2 = (rm2, rv2, mean2, invstd2, ctx.bn2[0], ctx.bn2[2])
        y1 = _bn_recompute(x, bn1_w, bn1_b, *bn1)
        a1 = F.silu(y1)
        args1 = ctx.args1
        d = F.conv2d(a1, w1, None, args1.stride, args1.padding, 1, args1.groups)
        grad_d, grad_bn2_w, grad_bn2_b, grad_w2, grad_b2 = _bn_swish_conv_backward(
            grad_out, d, bn2_w, bn2_b, bn2, w2, ctx.has_bias, ctx.args2, None
        )
        del d
        grad_x, grad_bn1_w, grad_bn1_b, grad_w1, _ = _bn_swish_conv_backward(
            grad_d, x, bn1_w, bn1_b, bn1, w1, False, args1, None, recomputed=(y1, a1)
        )
        return (
            grad_x, grad_bn1_w, grad_bn1_b, None, None, grad_bn2_w, grad_bn2_b, None, None,
            grad_w1, grad_w2, grad_b2, None, None, None, None,
        )  # fmt: skip


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast would run a conv in on `device_type`, or None (autocast off, or a device such as
    `meta` that has no autocast)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def _cast(dtype, *tensors):
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None else None for t in tensors)


class _ConvArgs(NamedTuple):
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    fast_depthwise: bool


class BatchNormSwish(nn.BatchNorm2d):
    """BatchNorm2d followed by Swish; with `fused`, the memory-saving recomputing version in training.

    Counted as a BN layer everywhere (regularization, readjustment). Without gradients (eval, sampling,
    export) it runs the standard ops, which give the same numbers.
    """

    def __init__(self, channels: int, fused: bool = True):
        super().__init__(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.fused = fused

    def uses_fused_op(self, x: torch.Tensor) -> bool:
        return self.fused and torch.is_grad_enabled() and x.requires_grad

    def _fused_bn_args(self) -> tuple:
        """The BN arguments of the fused autograd functions; counts the batch like `nn.BatchNorm2d` does."""
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        use_batch_stats = self.training or self.running_mean is None
        return (
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            use_batch_stats,
            self.momentum,
            self.eps,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_fused_op(x):
            return F.silu(super().forward(x), inplace=not torch.is_grad_enabled())
        return _BNSwishFunction.apply(x, *self._fused_bn_args())

    def forward_with_conv(self, x: torch.Tensor, conv: WNConv2d) -> torch.Tensor:
        """`conv(self(x))` keeping only `x` for backward (see `_BNSwishConvFunction`); needs `uses_fused_op(x)`."""
        w = conv.effective_weight()
        args = _ConvArgs(conv.stride, conv.padding, conv.groups, conv._fast_depthwise(x))
        return _BNSwishConvFunction.apply(x, *self._fused_bn_args(), w, conv.bias, args)

    def forward_with_two_convs(
        self, x: torch.Tensor, dwconv: WNConv2d, bn2: BatchNormSwish, conv2: WNConv2d
    ) -> torch.Tensor:
        """`conv2(bn2(dwconv(self(x))))` keeping only `x` for backward (see `_TwoBNSwishConvFunction`); for
        the modules `FusedSequential._two_blocks_at` accepts."""
        args1 = _ConvArgs(dwconv.stride, dwconv.padding, dwconv.groups, dwconv._fast_depthwise(x))
        args2 = _ConvArgs(conv2.stride, conv2.padding, conv2.groups, conv2._fast_depthwise(x))
        gamma1, beta1, mean1, var1, *flags1 = self._fused_bn_args()
        gamma2, beta2, mean2, var2, *flags2 = bn2._fused_bn_args()
        return _TwoBNSwishConvFunction.apply(
            x, gamma1, beta1, mean1, var1, gamma2, beta2, mean2, var2,
            dwconv.effective_weight(), conv2.effective_weight(), conv2.bias,
            tuple(flags1), tuple(flags2), args1, args2,
        )  # fmt: skip


class FusedSequential(nn.Sequential):
    """`nn.Sequential` that runs each (BatchNormSwish, WNConv2d) pair as one recomputing op in training.

    Same modules, parameters and state-dict keys as `nn.Sequential`; without gradients it is the plain chain.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mods = list(self)
        i = 0
        while i < len(mods):
            m = mods[i]
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            if type(m) is BatchNormSwish and isinstance(nxt, WNConv2d) and m.uses_fused_op(x):
                if self._two_blocks_at(mods, i, x):
                    x = m.forward_with_two_convs(x, nxt, mods[i + 2], mods[i + 3])
                    i += 4
                    continue
                x = m.forward_with_conv(x, nxt)
                i += 2
            else:
                x = m(x)
                i += 1
        return x

    @staticmethod
    def _two_blocks_at(mods: list[nn.Module], i: int, x: torch.Tensor) -> bool:
        """Whether mods[i:i+4] is BN-Swish, bias-free depthwise conv, BN-Swish, conv, runnable as one
        `_TwoBNSwishConvFunction` (fp32: autocast off)."""
        if i + 3 >= len(mods):
            return False
        dw, bn2, conv2 = mods[i + 1], mods[i + 2], mods[i + 3]
        return (
            type(bn2) is BatchNormSwish
            and bn2.fused
            and isinstance(conv2, WNConv2d)
            and dw.bias is None
            and dw.groups == dw.in_channels == dw.out_channels > 1
            and _autocast_dtype(x.device.type) is None
        )


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class SqueezeExcite(nn.Module):
    """Channel gating: global average -> Linear(C, max(C/16, 4)) -> ReLU -> Linear -> sigmoid. (B,C,H,W)."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(channels // 16, 4)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None]


class DownSkip(nn.Module):
    """Factorized reduce: Swish, then four 1x1 stride-2 convs on pixel offsets (0,0),(1,1),(0,1),(1,0).

    (B, C_in, H, W) -> (B, C_out, H/2, W/2).
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        q = c_out // 4
        widths = (q, q, q, c_out - 3 * q)
        self.convs = nn.ModuleList(WNConv2d(c_in, w, 1, stride=2, bias=True) for w in widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(x)
        shifted = (x, x[:, :, 1:, 1:], x[:, :, :, 1:], x[:, :, 1:, :])
        return torch.cat([conv(s) for conv, s in zip(self.convs, shifted, strict=True)], dim=1)


class UpSkip(nn.Module):
    """Bilinear x2 (align_corners) then a weight-normed 1x1 conv to C/2. (B,C,H,W) -> (B,C/2,2H,2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = WNConv2d(channels, channels // 2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))


class SyncBatchNormSwish(nn.SyncBatchNorm):
    """SyncBatchNorm followed by Swish: what `BatchNormSwish` becomes under multi-GPU DDP.

    `nn.SyncBatchNorm.convert_sync_batchnorm` would turn a `BatchNormSwish` into a plain SyncBatchNorm and
    silently drop the Swish; `training.distributed.convert_sync_batchnorm` maps it here instead. Unfused (the
    synchronised statistics need SyncBatchNorm's own autograd function), so it keeps two activations.
    (B, C, H, W) -> (B, C, H, W).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x))
