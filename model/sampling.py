"""Sampling from the prior: seeded noise per latent group, and images in [0, 1] at a temperature.

The noise comes from a CPU generator seeded with `seed`, so every backend (PyTorch on any device, the ONNX
sampler) draws the same numbers for the same seed.
"""

from __future__ import annotations

import torch

from model.distributions import quantize
from model.network import NVAE

DECODE_MODES = ("mean", "sample")


def draw_noise(model: NVAE, n: int, seed: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Standard-normal noise for every latent group (coarse first), (n, Z, H, W) each, from a CPU generator
    seeded with `seed`, so every backend (PyTorch on any device, ONNX) sees the same numbers."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((n, *shape), generator=g).to(device) for shape in model.latent_shapes()]


@torch.no_grad()
def decode_images(
    model: NVAE, logits: torch.Tensor, mode: str = "mean", temperature: float = 1.0, seed: int = 0
) -> torch.Tensor:
    """Turn head logits into data-sized images (B, C, D, D) in [0, 1], quantised to the data's levels.

    `mean`: the distribution's mean (deterministic); `sample`: a draw at `temperature` from a seeded generator.
    """
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode {mode!r}; choose one of: {', '.join(DECODE_MODES)}")
    dist = model.output_distribution(logits)
    if mode == "mean":
        x = dist.mean()
    else:
        x = dist.sample(temperature, torch.Generator(device=logits.device).manual_seed(seed))
    x = model.crop(x)
    bits = 1 if model.cfg.likelihood == "bernoulli" else model.cfg.num_bits
    return quantize(x, bits) if mode == "sample" or bits > 1 else x


@torch.no_grad()
def sample_images(
    model: NVAE,
    n: int,
    temperature: float,
    seed: int = 0,
    decode: str = "mean",
    batch_size: int = 64,
) -> torch.Tensor:
    """n images (n, C, D, D) in [0, 1] from the prior at `temperature`, the same for the same seed."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    device = model.h.device
    eps = draw_noise(model, n, seed)
    out = []
    for i in range(0, n, batch_size):
        chunk = [e[i : i + batch_size].to(device) for e in eps]
        logits = model.sample_logits(chunk[0].size(0), temperature, eps=chunk)
        out.append(decode_images(model, logits, decode, temperature, seed + i).cpu())
    return torch.cat(out)
