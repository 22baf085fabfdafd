"""Splits stored whole along the longer side, for a random square crop each epoch (LSUN's training split).

The authors train on LSUN with torchvision's `Resize(S)` then `RandomCrop(S)`: the shorter side becomes S, and
each time an image is read the S x S window sits at a uniformly drawn offset along the longer side. Such a
split keeps every resized image whole, in two files:

- `<split>.npy`: every image's uint8 (H, W, C) bytes, end to end (1-D);
- `<split>_index.npy`: int64 (N, 3), per image its byte offset, height and width (min(H, W) = S).

As an array (`StripSplit[i]`, slices, index arrays) it shows each image's centre square, as `CenterCrop(S)`:
what evaluation, FID statistics and the nearest-neighbour search read. Training batches take
`crop(indices, u)`, with u in [0, 1) per sample from the epoch plan.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.errors import DataError


def random_offset(extent: int, side: int, u: float) -> int:
    """torchvision's `RandomCrop` offset along a side of `extent`: uniform over 0..extent-side, from u in [0, 1)."""
    return min(int(u * (extent - side + 1)), extent - side)


def centre_offset(extent: int, side: int) -> int:
    """torchvision's `CenterCrop` offset along a side of `extent` (rounded half to even, as its `round`)."""
    return int(round((extent - side) / 2.0))


class StripSplit:
    """One split stored whole along the longer side (see the module docstring), read as (N, S, S, C)."""

    def __init__(self, data: np.ndarray, index: np.ndarray, side: int, channels: int):
        self.data, self.index, self.side, self.channels = data, index, side, channels
        self.shape = (len(index), side, side, channels)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4

    def __len__(self) -> int:
        return len(self.index)

    def whole(self, i: int) -> np.ndarray:
        """Image i as stored, uint8 (H, W, C)."""
        offset, h, w = (int(v) for v in self.index[i])
        return self.data[offset : offset + h * w * self.channels].reshape(h, w, self.channels)

    def _square(self, i: int, u: float | None) -> np.ndarray:
        image, s = self.whole(i), self.side
        h, w = image.shape[:2]
        if u is None:
            top, left = centre_offset(h, s), centre_offset(w, s)
        else:  # one of the two extents is S, so one offset is 0, as RandomCrop draws it
            top, left = random_offset(h, s, u), random_offset(w, s, u)
        return image[top : top + s, left : left + s]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return np.ascontiguousarray(self._square(int(key), None))
        rows = np.arange(len(self))[key]
        return self.crop(rows, None)

    def crop(self, indices: np.ndarray, fractions: np.ndarray | None) -> np.ndarray:
        """uint8 (B, S, S, C): image indices[b]'s square at fractions[b] along its longer side (None: centres)."""
        out = np.empty((len(indices), *self.shape[1:]), np.uint8)
        for b, i in enumerate(indices):
            out[b] = self._square(int(i), None if fractions is None else float(fractions[b]))
        return out


def check_strips(
    data: np.ndarray, index: np.ndarray, count: int, side: int, channels: int, path: Path
) -> None:
    """DataError naming `path` (the index file) unless `index` describes `count` images of shorter side `side`
    laid end to end over all of `data`."""
    if data.dtype != np.uint8 or data.ndim != 1:
        raise DataError(f"{path}: its data file holds {data.dtype} of shape {data.shape}; expected 1-D uint8")
    if index.dtype != np.int64 or index.shape != (count, 3):
        raise DataError(f"{path}: holds {index.dtype} {index.shape}; expected int64 ({count}, 3)")
    if count == 0:
        return
    offsets, heights, widths = index[:, 0], index[:, 1], index[:, 2]
    sizes = heights * widths * channels
    if (np.minimum(heights, widths) != side).any():
        bad = int(np.flatnonzero(np.minimum(heights, widths) != side)[0])
        raise DataError(
            f"{path}: image {bad} is {heights[bad]}x{widths[bad]}; its shorter side must be {side}"
        )
    ends = np.cumsum(sizes)
    if offsets[0] != 0 or (offsets[1:] != ends[:-1]).any() or ends[-1] != data.size:
        raise DataError(
            f"{path}: offsets do not lay the images end to end over the {data.size} bytes of data"
        )
