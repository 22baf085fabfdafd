"""Sampling beyond plain prior draws: fixed top scales (paper Fig. 12), reconstructions, and the nearest
training images of samples (App. B.1). Plain prior sampling is `model.prior_sampling`."""

from __future__ import annotations

import numpy as np
import torch

from model.network import NVAE
from model.prior_sampling import decode_images, draw_noise


@torch.no_grad()
def fixed_scale_rows(
    model: NVAE, n: int, temperature: float, seed: int = 0, decode: str = "mean"
) -> torch.Tensor:
    """Rows k = 0..num_scales: the top k latent scales share one draw, the finer ones are resampled per image
    (paper Fig. 12). Returns ((num_scales + 1) * n, C, D, D)."""
    device = model.h.device
    base = draw_noise(model, 1, seed)
    fresh = draw_noise(model, n, seed + 1)
    rows = []
    for k in range(model.cfg.num_scales + 1):
        eps = [
            (b.expand(n, -1, -1, -1) if scale < k else f).to(device)
            for b, f, scale in zip(base, fresh, model.group_scales, strict=True)
        ]
        logits = model.sample_logits(n, temperature, eps=eps)
        rows.append(decode_images(model, logits, decode, temperature, seed).cpu())
    return torch.cat(rows)


@torch.no_grad()
def reconstructions(model: NVAE, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Encode x (B, C, D, D), sample each posterior group once, decode the mean image: (B, C, D, D)."""
    g = torch.Generator().manual_seed(seed)
    eps = [torch.randn((x.size(0), *s), generator=g).to(x.device) for s in model.latent_shapes()]
    out = model(x, eps=eps)
    return decode_images(model, out.logits, "mean").cpu()


def nearest_neighbours(
    samples: np.ndarray,
    train: np.ndarray,
    k: int = 5,
    downsample: int | None = None,
    crop: float = 0.5,
    chunk: int = 4096,
) -> np.ndarray:
    """Indices (S, k) of the k training images closest to each sample by L2 distance after the paper's
    comparison (App. B.1): average-pool by `downsample` (default 4 for images >= 64 px, else 1), then keep
    the central `crop` fraction of each side. samples (S, H, W, C) and train (N, H, W, C), uint8 or float."""
    import torch.nn.functional as F

    side = samples.shape[1]
    if downsample is None:
        downsample = 4 if side >= 64 else 1
    if not 0 < crop <= 1:
        raise ValueError(f"crop={crop} must be in (0, 1]")

    def features(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(a, dtype=np.float32)).permute(0, 3, 1, 2)
        if a.dtype == np.uint8:
            t = t / 255.0
        if downsample > 1:
            t = F.avg_pool2d(t, downsample)
        s = t.shape[-1]
        c = max(1, int(round(s * crop)))
        o = (s - c) // 2
        return t[..., o : o + c, o : o + c].flatten(1)

    q = features(samples)
    best_d = torch.full((q.size(0), k), float("inf"))
    best_i = torch.zeros((q.size(0), k), dtype=torch.long)
    for start in range(0, train.shape[0], chunk):
        f = features(train[start : start + chunk])
        d = torch.cdist(q, f)
        d_all = torch.cat([best_d, d], dim=1)
        i_all = torch.cat([best_i, torch.arange(start, start + f.size(0)).expand(q.size(0), -1)], dim=1)
        best_d, pos = d_all.topk(k, dim=1, largest=False)
        best_i = torch.gather(i_all, 1, pos)
    return best_i.numpy()
