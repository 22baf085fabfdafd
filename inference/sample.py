"""Sampling beyond plain prior draws: fixed top scales (paper Fig. 12), reconstructions, and the nearest
training images of samples (App. B.1); `sample_to_dir` and `nearest_grid` write them to files. Plain prior
sampling is `model.prior_sampling`."""

from __future__ import annotations

import logging
import math
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from common.errors import ConfigError, DataError
from common.files import atomic_open, check_writable
from data.images import image_grid, save_png, to_uint8
from inference.checkpoints import default_device, load_for_inference
from model.network import NVAE
from model.prior_sampling import decode_images, draw_noise, sample_images

log = logging.getLogger(__name__)


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
        raise ConfigError(f"crop={crop} must be in (0, 1]")

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


# --------------------------------------------------------------------------- samples to files
MAX_SAMPLE_BYTES = 2 << 30  # float32 images held at once by one `sample_to_dir` call


class Sampler(Protocol):
    """What `sample_to_dir` uses of an ONNX decoder (`serving.onnx_sampler.OnnxSampler` is one)."""

    decode: str
    image_shape: tuple[int, ...]
    providers: list[str]

    def sample(self, n: int, temperature: float, seed: int) -> np.ndarray: ...


@dataclass
class SampleResult:
    """What `sample_to_dir` wrote, in order (PNG grids, then samples.npz), and the onnxruntime providers the
    ONNX decoder ran on (None when sampling a checkpoint)."""

    written: list[Path]
    providers: list[str] | None = None


def sample_to_dir(
    out: str | Path,
    *,
    temperatures: Sequence[float],
    checkpoint: str | Path | None = None,
    onnx: str | Path | None = None,
    open_onnx: Callable[[str | Path, str], Sampler] | None = None,
    n: int = 64,
    seed: int = 0,
    decode: str | None = None,
    reconstruct: bool = False,
    data: str | Path | None = None,
    fix_scales: bool = False,
    nrow: int | None = None,
    device: str | None = None,
) -> SampleResult:
    """Draw `n` prior samples per temperature from `checkpoint` or from the ONNX decoder `onnx` (exactly one)
    and write, each file atomically, under `out`: grid_t<T>.png per temperature; with `fix_scales`
    fixed_scales_t<T>.png (`fixed_scale_rows`); with `reconstruct` reconstructions.png (rows of `data`'s test
    images, each followed by its reconstructions); then samples.npz: `temperatures` and uint8 (N, H, W, C)
    arrays images_t<T> (and inputs, reconstructions). The same seed gives the same images from either source.

    `open_onnx(path, providers)` opens `onnx` (this layer does not import serving); `device` picks its
    providers: "cuda" must load, "cpu", or None for CUDA if it loads. `decode`: "mean" or "sample" (None:
    mean for a checkpoint, the export's own for ONNX). Returns a `SampleResult`. Raises ConfigError for
    conflicting options or too many images, before any sampling.
    """
    if bool(checkpoint) == bool(onnx):
        raise ConfigError("give exactly one of --checkpoint or --onnx")
    if (reconstruct or fix_scales) and not checkpoint:
        raise ConfigError("--reconstruct and --fix-scales need --checkpoint")
    if reconstruct and not data:
        raise ConfigError("--reconstruct needs --data (a prepared dataset)")
    out, model, providers = Path(out), None, None
    check_writable(out / "samples.npz")  # a read-only or full folder is found before any sampling
    if onnx:
        sampler = _open_sampler(open_onnx, onnx, n, decode, device)
        providers = sampler.providers
        draw = lambda t: sampler.sample(n, t, seed)  # noqa: E731
    else:
        model = _load_sampling_model(checkpoint, n, temperatures, device)
        decode = decode or "mean"
        draw = lambda t: sample_images(model, n, t, seed, decode=decode)  # noqa: E731
    arrays: dict[str, np.ndarray] = {"temperatures": np.asarray(temperatures, dtype=np.float32)}
    drawn = {}
    for t in temperatures:  # every temperature first: a grid is written only when all of them are images
        images = draw(t)
        finite = images.isfinite().all() if hasattr(images, "isfinite") else np.isfinite(images).all()
        if not bool(finite):
            raise ConfigError(
                f"--temperature {t:g}: the decoder's output is not finite (the prior's latents overflow "
                "float32 there); sample at a lower temperature"
            )
        drawn[t] = images
    written = []
    for t, images in drawn.items():
        arrays[f"images_t{t:g}"] = to_uint8(images)
        written.append(_save_grid(images, nrow, out / f"grid_t{t:g}.png"))
        if fix_scales:
            rows = fixed_scale_rows(model, nrow or 8, t, seed, decode)
            written.append(_save_grid(rows, nrow or 8, out / f"fixed_scales_t{t:g}.png"))
    if reconstruct:
        x, rec = _reconstruct(model, data, n, seed)
        written.append(
            _save_grid(_interleave_rows(x, rec, nrow or 8), nrow or 8, out / "reconstructions.png")
        )
        arrays["inputs"], arrays["reconstructions"] = to_uint8(x), to_uint8(rec)
    with atomic_open(out / "samples.npz") as fh:
        np.savez_compressed(fh, **arrays)
    written.append(out / "samples.npz")
    return SampleResult(written, providers)


def check_sample_count(n: int, image_shape: Sequence[int]) -> None:
    """ConfigError when `n` float32 images of (C, H, W) `image_shape` would exceed MAX_SAMPLE_BYTES."""
    per_image = 4 * math.prod(image_shape)
    most = MAX_SAMPLE_BYTES // per_image
    if n > most:
        raise ConfigError(
            f"--n {n} would hold {n * per_image / 2**30:.1f} GiB of {tuple(image_shape)} images; at most {most} "
            "per call (run several with different --seed)"
        )


def _open_sampler(open_onnx, onnx, n: int, decode: str | None, device: str | None) -> Sampler:
    """The ONNX decoder, checked against the requested decode mode and image count."""
    sampler = open_onnx(onnx, {"cuda": "cuda", "cpu": "cpu"}.get(device or "", "auto"))
    if decode and decode != sampler.decode:
        raise ConfigError(
            f"{onnx} was exported with decode={sampler.decode}; re-export with `nvae export-onnx --decode {decode}`"
        )
    check_sample_count(n, sampler.image_shape)
    return sampler


def _load_sampling_model(checkpoint, n: int, temperatures: Sequence[float], device: str | None) -> NVAE:
    """The checkpoint's model, after the image-count check and a warning when its BN statistics do not
    match the sampling temperatures."""
    model, payload = load_for_inference(checkpoint, default_device(device))
    check_sample_count(n, (model.cfg.in_channels, model.cfg.data_size, model.cfg.data_size))
    readjusted = (payload.get("bn_readjust") or {}).get("temperature")
    for t in temperatures:
        if readjusted is None:
            log.warning("BN statistics are the training averages; `nvae readjust-bn` gives better samples")
            break
        if abs(readjusted - t) > 1e-6:
            log.warning("BN was readjusted at t=%g but sampling at t=%g", readjusted, t)
    return model


def _save_grid(images, nrow: int | None, path: Path) -> Path:
    """`image_grid` of (B, C, H, W) `images` written to `path` as PNG; returns `path`."""
    save_png(image_grid(images, nrow=nrow), path)
    return path


def _reconstruct(model: NVAE, data, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `n` test images of prepared `data` (B, C, D, D) and their reconstructions, both on CPU."""
    from data.loaders import make_loader
    from inference.evaluate import check_data_matches

    check_data_matches(model, data)
    loader = make_loader(
        data, "test", n, train=False, flip=False, drop_last=False, binarize=model.cfg.binarize
    )
    x = next(iter(loader)).to(model.h.device)
    return x.cpu(), reconstructions(model, x, seed)


def _interleave_rows(x: torch.Tensor, rec: torch.Tensor, nrow: int) -> torch.Tensor:
    """Rows of `nrow` inputs, each followed by the row of their reconstructions."""
    rows = []
    for i in range(0, x.size(0), nrow):
        rows += [x[i : i + nrow], rec[i : i + nrow]]
    return torch.cat(rows)


# --------------------------------------------------------------------------- nearest neighbours to a file
@dataclass
class NearestResult:
    """What `nearest_grid` wrote: the PNG, the .npz array it compared, and how many samples it shows."""

    path: Path
    key: str
    samples: int


def nearest_grid(
    samples: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    key: str | None = None,
    k: int = 5,
    limit: int = 8,
) -> NearestResult:
    """Write to `out` a PNG whose rows are each of the first `limit` samples of array `key` of a samples
    .npz (default: its first images_t*), followed by its `k` nearest training images of prepared `data`
    (`nearest_neighbours`). Returns a `NearestResult`; DataError for an unreadable .npz, a missing array or
    samples of another shape than the training images."""
    from data.loaders import load_split, read_manifest

    try:
        with np.load(samples) as npz:
            keys = [name for name in npz.files if name.startswith("images_")]
            key = key or (keys[0] if keys else None)
            if key not in npz.files:
                raise DataError(f"{samples}: no array {key!r} (has: {', '.join(npz.files)})")
            images = npz[key][:limit]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{samples}: not a readable samples .npz ({exc})") from None
    manifest = read_manifest(data)
    train = load_split(data, "train")
    if train.shape[1:] != images.shape[1:]:
        raise DataError(
            f"samples are {images.shape[1:]} but {data} ({manifest['dataset']}) holds {train.shape[1:]} images"
        )
    idx = nearest_neighbours(images, train, k=k)
    tiles = []
    for s, row in zip(images, idx, strict=True):
        tiles.append(s)
        tiles.extend(train[i] for i in row)
    arr = torch.as_tensor(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255
    save_png(image_grid(arr, nrow=k + 1), out)
    return NearestResult(Path(out), key, len(images))
