"""Building blocks: weight-normed (optionally masked) conv, fused BN+Swish, squeeze-excitation, skip paths."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BN_MOMENTUM = 0.05
BN_EPS = 1e-5


class WNConv2d(nn.Conv2d):
    """Conv2d with weight normalization `w = exp(log_g) * v / ||v||` per output channel.

    `mask` (a buffer, for autoregressive convs) multiplies `v` before normalization. `init_scale` scales the
    initial `v` (and so the initial effective weight, since `log_g` is initialised from the scaled `v`).
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
        if init_scale != 1.0:
            with torch.no_grad():
                self.weight.mul_(init_scale)
        if mask is not None:
            self.register_buffer("mask", mask.to(self.weight.dtype))
        else:
            self.mask = None
        if weight_norm:
            v = self.weight if mask is None else self.weight * self.mask
            norm = v.detach().flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            self.log_g = nn.Parameter(torch.log(norm + 0.01))
        else:
            self.register_parameter("log_g", None)

    def effective_weight(self) -> torch.Tensor:
        """The weight the convolution uses: masked and weight-normalised, (C_out, C_in/groups, k, k)."""
        w = self.weight
        if self.mask is not None:
            w = w * self.mask
        if self.log_g is not None:
            norm = w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            w = self.log_g.exp() * w / (norm + 1e-5)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), self.bias, self.stride, self.padding, 1, self.groups)


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
        if ctx.training:  # recompute y with the batch statistics saved in forward
            mean, var = save_mean, save_invstd.pow(-2) - ctx.eps
        else:
            mean, var = running_mean, running_var
        y, _, _ = torch.ops.aten.native_batch_norm(x, weight, bias, mean, var, False, 0.0, ctx.eps)
        grad_y = torch.ops.aten.silu_backward(grad_out, y)
        grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
            grad_y,
            x,
            weight,
            running_mean,
            running_var,
            save_mean,
            save_invstd,
            ctx.training,
            ctx.eps,
            [True, True, True],
        )
        return grad_x, grad_w, grad_b, None, None, None, None, None


class BatchNormSwish(nn.BatchNorm2d):
    """BatchNorm2d followed by Swish; with `fused`, the memory-saving recomputing version in training.

    Counted as a BN layer everywhere (regularization, readjustment). Without gradients (eval, sampling,
    export) it runs the standard ops, which give the same numbers.
    """

    def __init__(self, channels: int, fused: bool = True):
        super().__init__(channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training or self.running_mean is None
        if not (self.fused and torch.is_grad_enabled() and x.requires_grad):
            return F.silu(super().forward(x))
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        return _BNSwishFunction.apply(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            use_batch_stats,
            self.momentum,
            self.eps,
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
    silently drop the Swish; `model.distributed.convert_sync_batchnorm` maps it here instead. Unfused (the
    synchronised statistics need SyncBatchNorm's own autograd function), so it keeps two activations.
    (B, C, H, W) -> (B, C, H, W).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x))
