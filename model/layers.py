"""Building blocks: weight-normed (optionally masked) conv, fused BN+Swish, squeeze-excitation, skip paths.

The modules decide where a fast path of `model.fused` applies and run the plain PyTorch ops elsewhere.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from model.fused import (
    ConvArgs,
    _BNSwishConvFunction,
    _BNSwishFunction,
    _DepthwiseConv,
    _TwoBNSwishConvFunction,
    autocast_dtype,
    elu,
)

BN_MOMENTUM = 0.05
BN_EPS = 1e-5


class ELU(nn.Module):
    """`nn.ELU()` through `model.fused.elu` (no state: checkpoints are unchanged)."""

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
            # backward would also keep
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


@contextlib.contextmanager
def shared_effective_weights(model: nn.Module) -> Iterator[None]:
    """Within the block, every `WNConv2d` of `model` normalises its weight once and reuses the result.

    A training step uses each weight twice (the forward pass and the spectral regularizer); sharing the
    normalised weight halves the weight-norm work in forward and backward without changing any value.
    Inference loops (evaluation, BN readjustment, sampling) normalise once for all their passes instead of
    once per batch. Parameters must not change inside the block. Nested blocks keep the outer one's weights.
    """
    convs = [m for m in model.modules() if isinstance(m, WNConv2d) and m._weight_cache is None]
    for m in convs:
        m._weight_cache = []
    try:
        yield
    finally:
        for m in convs:
            m._weight_cache = None


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
        args = ConvArgs(conv.stride, conv.padding, conv.groups, conv._fast_depthwise(x))
        return _BNSwishConvFunction.apply(x, *self._fused_bn_args(), w, conv.bias, args)

    def forward_with_two_convs(
        self, x: torch.Tensor, dwconv: WNConv2d, bn2: BatchNormSwish, conv2: WNConv2d
    ) -> torch.Tensor:
        """`conv2(bn2(dwconv(self(x))))` keeping only `x` for backward (see `_TwoBNSwishConvFunction`); for
        the modules `FusedSequential._two_blocks_at` accepts."""
        args1 = ConvArgs(dwconv.stride, dwconv.padding, dwconv.groups, dwconv._fast_depthwise(x))
        args2 = ConvArgs(conv2.stride, conv2.padding, conv2.groups, conv2._fast_depthwise(x))
        gamma1, beta1, mean1, var1, *flags1 = self._fused_bn_args()
        gamma2, beta2, mean2, var2, *flags2 = bn2._fused_bn_args()
        return _TwoBNSwishConvFunction.apply(
            x, gamma1, beta1, mean1, var1, gamma2, beta2, mean2, var2,
            dwconv.effective_weight(), conv2.effective_weight(), conv2.bias,
            tuple(flags1), tuple(flags2), args1, args2,
        )  # fmt: skip


# Eval-mode BN folded into the neighbouring convolution (`FusedSequential`), without gradients. A switch for
# side-by-side measurements and tests (`bn_folding(False)`); on by default.
_FOLD_BN = [True]


@contextlib.contextmanager
def bn_folding(enabled: bool) -> Iterator[None]:
    """Within the block, fold eval-mode BN into convolutions (`enabled`) or run the plain chain."""
    before = _FOLD_BN[0]
    _FOLD_BN[0] = enabled
    try:
        yield
    finally:
        _FOLD_BN[0] = before


def _eval_bn(m: nn.Module) -> bool:
    """A BN (plain or with Swish) that normalises by its running statistics."""
    return type(m) in (nn.BatchNorm2d, BatchNormSwish) and not m.training and m.running_var is not None


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) with bn(x) = s * x + t per channel, in float32."""
    s = bn.running_var.float().add(bn.eps).rsqrt()
    if bn.weight is not None:
        s = s * bn.weight.float()
    t = -bn.running_mean.float() * s
    if bn.bias is not None:
        t = t + bn.bias.float()
    return s, t


def _pointwise(m: nn.Module) -> bool:
    """A 1x1 conv without padding or groups: a BN before it folds in exactly (no padded border)."""
    return isinstance(m, WNConv2d) and m.kernel_size == (1, 1) and m.padding == (0, 0) and m.groups == 1


class FusedSequential(nn.Sequential):
    """`nn.Sequential` that runs each (BatchNormSwish, WNConv2d) pair as one recomputing op in training.

    Same modules, parameters and state-dict keys as `nn.Sequential`. Without gradients it is the plain chain,
    except that a BN in eval mode folds into the convolution beside it (`_folded_forward`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            _FOLD_BN[0]
            and not torch.is_grad_enabled()
            and not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())
        ):
            return self._folded_forward(x)
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

    def _folded_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The chain with each eval-mode BN folded into a convolution: one after a conv scales its output
        channels (w * s, (b - mean) * s + beta); one before a 1x1 conv scales its input channels (w * s, b + w t).
        The folded weights are computed once per call, as the weight norm is; values change at float rounding
        only (bench/RESULTS.md). BNs in training mode (BN readjustment) and other modules run as they are."""
        mods = list(self)
        i = 0
        while i < len(mods):
            m = mods[i]
            before = _eval_bn(m) and i + 1 < len(mods) and _pointwise(mods[i + 1])
            conv = mods[i + 1] if before else m
            after = (
                isinstance(conv, WNConv2d) and i + 1 + before < len(mods) and _eval_bn(mods[i + 1 + before])
            )
            if not (before or after):
                x = m(x)
                i += 1
                continue
            w = conv.effective_weight().float()
            b = conv.bias.float() if conv.bias is not None else torch.zeros(w.size(0), device=w.device)
            if before:
                s, t = _bn_scale_shift(m)
                b = b + (w.flatten(1) @ t)
                w = w * s.view(1, -1, 1, 1)
            i += 1 + before
            swish = False
            if after:
                bn = mods[i]
                s, t = _bn_scale_shift(bn)
                w, b = w * s.view(-1, 1, 1, 1), b * s + t
                swish = type(bn) is BatchNormSwish
                i += 1
            x = F.conv2d(
                x, w.to(conv.weight.dtype), b.to(conv.weight.dtype), conv.stride, conv.padding, 1, conv.groups
            )
            if swish:
                x = F.silu(x, inplace=True)
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
            and autocast_dtype(x.device.type) is None
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

    Each stride-2 1x1 conv runs as a stride-1 1x1 conv of the subsampled view `s[:, :, ::2, ::2]`: the same
    products and sums, on a quarter of the input, 10-30 % faster on the CPU (bench/RESULTS.md). It also
    avoids a oneDNN fault: the AVX-512 kernel of a stride-2 1x1 conv's weight gradient corrupts the heap on
    channels-last inputs of fewer than 16 channels at 48x48 pixels and more (torch 2.14's oneDNN).

    (B, C_in, H, W) -> (B, C_out, H/2, W/2).
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        q = c_out // 4
        widths = (q, q, q, c_out - 3 * q)
        self.convs = nn.ModuleList(WNConv2d(c_in, w, 1, bias=True) for w in widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.silu(x)
        shifted = (x, x[:, :, 1:, 1:], x[:, :, :, 1:], x[:, :, 1:, :])
        return torch.cat(
            [conv(s[:, :, ::2, ::2]) for conv, s in zip(self.convs, shifted, strict=True)], dim=1
        )


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
