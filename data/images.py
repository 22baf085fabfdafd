"""Image arrays to files: tile a batch into one grid, write PNGs atomically (numpy + Pillow)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from common.files import atomic_path


def to_uint8(images) -> np.ndarray:
    """(B, C, H, W) float in [0, 1] (a numpy array or a CPU tensor) -> (B, H, W, C) uint8, rounded."""
    arr = np.asarray(images, dtype=np.float32)
    return (np.clip(arr, 0, 1).transpose(0, 2, 3, 1) * 255 + 0.5).astype(np.uint8)


def image_grid(images, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile (B, C, H, W) images in [0, 1] (a numpy array or a CPU tensor) into one uint8 array (H', W', C)
    with `pad` white pixels between."""
    images = np.asarray(images, dtype=np.float32)
    b, c, h, w = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(b))))
    rows = int(math.ceil(b / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    arr = to_uint8(images)
    for k in range(b):
        r, col = divmod(k, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = arr[k]
    return grid


def save_png(array: np.ndarray, path: str | Path) -> None:
    """Write an (H, W, C) uint8 array as PNG, atomically (`common.files.atomic_path`)."""
    from PIL import Image

    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
