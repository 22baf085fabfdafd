"""Residual cells (paper Fig. 3) and the combiner cells that join the encoder and decoder towers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.layers import (
    BatchNormSwish,
    DownSkip,
    FusedSequential,
    SqueezeExcite,
    UpSkip,
    WNConv2d,
    batch_norm,
)

RESIDUAL_SCALE = 0.1


class EncoderCell(nn.Module):
    """Fig. 3b: `skip(x) + 0.1 * SE([BN -> Swish -> 3x3 conv] x 2)`; `down` halves H, W and doubles C.

    Used by the encoder tower, its down cells and the preprocess blocks. (B,C_in,H,W) -> (B,C_out,H',W').
    """

    def __init__(self, c_in: int, c_out: int, down: bool = False, fused_bn_swish: bool = True):
        super().__init__()
        stride = 2 if down else 1
        self.skip = DownSkip(c_in, c_out) if down else nn.Identity()
        self.branch = FusedSequential(
            BatchNormSwish(c_in, fused_bn_swish),
            WNConv2d(c_in, c_out, 3, stride=stride, padding=1, bias=True),
            BatchNormSwish(c_out, fused_bn_swish),
            WNConv2d(c_out, c_out, 3, padding=1, bias=True),
            SqueezeExcite(c_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + RESIDUAL_SCALE * self.branch(x)


class _NearestUp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest")


class DecoderCell(nn.Module):
    """Fig. 3a: `skip(x) + 0.1 * SE(BN -> 1x1 (xE) -> BN-Swish -> dw 5x5 -> BN-Swish -> 1x1 -> BN)`.

    `up` first upsamples (nearest) and halves the channels; the skip is then bilinear x2 + 1x1 conv.
    Convs here have neither weight norm nor bias. (B,C_in,H,W) -> (B,C_out,H',W').
    """

    def __init__(self, c_in: int, c_out: int, expansion: int, up: bool = False, fused_bn_swish: bool = True):
        super().__init__()
        hidden = c_in * expansion
        self.skip = UpSkip(c_in) if up else nn.Identity()
        layers: list[nn.Module] = [_NearestUp()] if up else []
        layers += [
            batch_norm(c_in),
            WNConv2d(c_in, hidden, 1, bias=False, weight_norm=False),
            BatchNormSwish(hidden, fused_bn_swish),
            WNConv2d(hidden, hidden, 5, padding=2, groups=hidden, bias=False, weight_norm=False),
            BatchNormSwish(hidden, fused_bn_swish),
            WNConv2d(hidden, c_out, 1, bias=False, weight_norm=False),
            batch_norm(c_out),
            SqueezeExcite(c_out),
        ]
        self.branch = FusedSequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + RESIDUAL_SCALE * self.branch(x)


class EncoderCombiner(nn.Module):
    """`x_enc + 1x1(s_dec)`: injects the decoder state into the encoder feature of a group."""

    def __init__(self, c_enc: int, c_dec: int):
        super().__init__()
        self.conv = WNConv2d(c_dec, c_enc, 1, bias=True)

    def forward(self, x_enc: torch.Tensor, s_dec: torch.Tensor) -> torch.Tensor:
        return x_enc + self.conv(s_dec)


class DecoderCombiner(nn.Module):
    """1x1 conv over `concat(s, z)` back to the feature width: (B,C,H,W),(B,Z,H,W) -> (B,C,H,W)."""

    def __init__(self, channels: int, z_channels: int):
        super().__init__()
        self.conv = WNConv2d(channels + z_channels, channels, 1, bias=True)

    def forward(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([s, z.to(s.dtype)], dim=1))
