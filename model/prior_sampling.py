"""Sampling from the prior: seeded noise per latent group, and images in [0, 1] at a temperature.

All noise comes from NumPy's generator (`numpy.random.default_rng(seed)`, float32), so every backend draws
the same numbers for the same seed: PyTorch on any device, and the torch-free ONNX sampler (`serving`).
"""

from __future__ import annotations

import numpy as np
import torch

from common.errors import ConfigError
from model.distributions import Bernoulli, quantize
from model.layers import shared_effective_weights
from model.network import NVAE

DECODE_MODES = ("mean", "sample")


def draw_noise(model: NVAE, n: int, seed: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Standard-normal noise for every latent group (coarse first), (n, Z, H, W) each, from NumPy's generator
    seeded with `seed`, so every backend (PyTorch on any device, ONNX) sees the same numbers."""
    rng = np.random.default_rng(seed)
    return [
        torch.from_numpy(rng.standard_normal((n, *shape), dtype=np.float32)).to(device)
        for shape in model.latent_shapes()
    ]


def draw_uniforms(dist, seed: int) -> list[torch.Tensor]:
    """The uniform draws of `dist.sample` (u_mix then u_pix for the mixture, u_pix for Bernoulli), from
    NumPy's generator seeded with `seed`: the `u_*` inputs of the exported graph."""
    rng = np.random.default_rng(seed)
    if isinstance(dist, Bernoulli):
        like = [dist.logits]
    else:
        like = [dist.logit_probs, dist.means[:, :, 0]]
    return [torch.from_numpy(rng.random(tuple(t.shape), dtype=np.float32)).to(t.device) for t in like]


@torch.no_grad()
def decode_images(
    model: NVAE, logits: torch.Tensor, mode: str = "mean", temperature: float = 1.0, seed: int = 0
) -> torch.Tensor:
    """Turn head logits into data-sized images (B, C, D, D) in [0, 1], quantised to the data's levels.

    `mean`: the distribution's mean (deterministic); `sample`: a draw from uniforms of NumPy's generator
    seeded with `seed`, at temperature 1 as the authors' sample mode (`output.sample()`): the prior's
    `temperature` applies to the latents only, never to the pixels. `temperature` is kept for the callers'
    signature and ignored.
    """
    if mode not in DECODE_MODES:
        raise ConfigError(f"decode mode {mode!r}; choose one of: {', '.join(DECODE_MODES)}")
    dist = model.output_distribution(logits)
    if mode == "mean":
        x = dist.mean()
    else:
        x = dist.sample_from_uniform(*draw_uniforms(dist, seed), temperature=1.0)
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
        raise ConfigError(f"temperature={temperature} must be > 0")
    device = model.h.device
    eps = draw_noise(model, n, seed)
    out = []
    with shared_effective_weights(model):  # one weight norm for all batches
        for i in range(0, n, batch_size):
            chunk = [e[i : i + batch_size].to(device) for e in eps]
            logits = model.sample_logits(chunk[0].size(0), temperature, eps=chunk)
            out.append(decode_images(model, logits, decode, temperature, seed + i).cpu())
    return torch.cat(out)
