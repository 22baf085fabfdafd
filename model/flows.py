"""Inverse autoregressive flows (paper Sec. 3.2, App. A): masked convolutional cells, volume preserving."""

from __future__ import annotations

import torch
from torch import nn

from model.fused import elu
from model.layers import WNConv2d


def channel_mask(c_in: int, c_out: int, zero_diag: bool) -> torch.Tensor:
    """(C_out, C_in) mask of the centre tap: output block i sees input channels < i (<= i if not zero_diag).

    Channels are ordered; with C_out = r * C_in output channels i*r..(i+1)*r-1 belong to input channel i, and
    with C_in = r * C_out input channels i*r..(i+1)*r-1 belong to output channel i.
    """
    mask = torch.ones(c_out, c_in)
    if c_out >= c_in:
        r = c_out // c_in
        for i in range(c_in):
            mask[i * r : (i + 1) * r, i + 1 :] = 0
            if zero_diag:
                mask[i * r : (i + 1) * r, i] = 0
    else:
        r = c_in // c_out
        for i in range(c_out):
            mask[i, (i + 1) * r :] = 0
            if zero_diag:
                mask[i, i * r : (i + 1) * r] = 0
    return mask


def ar_mask(c_in: int, c_out: int, k: int, groups: int, zero_diag: bool, mirror: bool) -> torch.Tensor:
    """Mask (C_out, C_in/groups, k, k) for a conv autoregressive in raster order, channels at the centre.

    `mirror` flips it spatially: the order becomes reverse raster (channel order unchanged).
    """
    if c_in % c_out and c_out % c_in:
        raise ValueError(f"autoregressive conv needs one of C_in={c_in}, C_out={c_out} to divide the other")
    m = (k - 1) // 2
    mask = torch.ones(c_out, c_in // groups, k, k)
    mask[:, :, m:, :] = 0
    mask[:, :, m, :m] = 1
    if groups == 1:
        mask[:, :, m, m] = channel_mask(c_in, c_out, zero_diag)
    elif groups == c_in:  # depthwise: each channel sees itself at the centre
        mask[:, :, m, m] = 0.0 if zero_diag else 1.0
    else:
        raise ValueError("autoregressive conv supports groups == 1 or depthwise only")
    if mirror:
        mask = torch.flip(mask, dims=(2, 3))
    return mask


class FlowCell(nn.Module):
    """One additive IAF step `z <- z - shift(z)`, with shift autoregressive in z; log-det is 0.

    masked 3x3 conv z->6z (centre excludes the same channel) -> ELU -> masked depthwise 5x5 -> ELU
    -> ELU -> masked 1x1 6z->z (its initial gain x0.1, as the authors). (B,Z,H,W) -> (B,Z,H,W).
    """

    def __init__(self, z_channels: int, mirror: bool, expansion: int = 6):
        super().__init__()
        hidden = z_channels * expansion
        self.mirror = mirror
        self.conv1 = WNConv2d(
            z_channels, hidden, 3, padding=1, bias=False, mask=ar_mask(z_channels, hidden, 3, 1, True, mirror)
        )
        self.conv2 = WNConv2d(
            hidden,
            hidden,
            5,
            padding=2,
            groups=hidden,
            bias=False,
            mask=ar_mask(hidden, hidden, 5, hidden, False, mirror),
        )
        self.shift = WNConv2d(
            hidden,
            z_channels,
            1,
            bias=True,
            mask=ar_mask(hidden, z_channels, 1, 1, False, mirror),
            init_scale=0.1,
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = elu(self.conv1(z))
        h = elu(self.conv2(h))
        return z - self.shift(elu(h)).to(z.dtype)


class FlowPair(nn.Module):
    """Two flow cells, the second spatially mirrored, so every position can depend on every other."""

    def __init__(self, z_channels: int):
        super().__init__()
        self.cell1 = FlowCell(z_channels, mirror=False)
        self.cell2 = FlowCell(z_channels, mirror=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.cell2(self.cell1(z))
