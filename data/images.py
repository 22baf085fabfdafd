"""Image arrays to files: tile a batch into one grid, write PNGs atomically (numpy + Pillow)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def image_grid(images, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (B, C, H, W) images in [0, 1] (a numpy array or a CPU tensor) into one uint8 array (H', W', C)
    with `pad` white pixels between."""
    images = np.asarray(images, dtype=np.float32)
    b, c, h, w = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(b))))
    rows = int(math.ceil(b / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    arr = (np.clip(images, 0, 1).transpose(0, 2, 3, 1) * 255 + 0.5).astype(np.uint8)
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
