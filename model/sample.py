"""Sampling from the prior: seeded noise, images in [0, 1] at a temperature, and PNG grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
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


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (B, C, H, W) images in [0, 1] into one uint8 array (H', W', C) with `pad` pixels between."""
    b, c, h, w = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(b))))
    rows = int(math.ceil(b / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    for k in range(b):
        r, col = divmod(k, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = arr[k]
    return grid


def save_png(array: np.ndarray, path: str | Path) -> None:
    """Write an (H, W, C) uint8 array as PNG, atomically (temporary file, then rename)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)


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
