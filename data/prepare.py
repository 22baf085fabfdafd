"""`nvae prepare`: a raw dataset -> uint8 arrays per split (N, H, W, C) as .npy, plus `manifest.json`.

Everything is written into a hidden temporary directory next to `out` and renamed into place at the end, so
an interrupted or failed run never leaves something that looks complete. The output is a pure function of
the input files and the arguments: no timestamps, fixed ordering, so a re-run is byte-identical.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DataError
from common.files import atomic_path, file_sha256
from common.progress import progress as progress_bar
from data.dali_ops import ArrayPipeline, ImagePipeline, resolve_device
from data.more_sources import read_lsun_source, read_omniglot_source, read_stacked_mnist_source
from data.recipes import Recipe, get_recipe
from data.remote import fetch_source, is_s3_uri
from data.sources import (
    DEFAULT_MAX_FILE_MB,
    DEFAULT_MAX_PIXELS,
    ArraySource,
    ImageSource,
    SourceFile,
    check_encoded,
    read_cifar10_source,
    read_encoded,
    read_idx_source,
    read_image_source,
    read_imagenet32_source,
    relative_name,
    sha256_bytes,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SOURCES_NAME = "sources.sha256"
FORMAT_VERSION = 1
ALLOWED_BITS = (8, 5)
INLINE_SOURCE_LIMIT = 1000  # list source checksums in the manifest itself up to this many files


@dataclass
class _Progress:
    """What the split writers share: the progress bar, skipped images and the source files read."""

    bar: Any  # common.progress.progress
    skipped: list[dict[str, str]] = field(default_factory=list)
    files: list[SourceFile] = field(default_factory=list)


def prepare(
    dataset: str,
    source: str | Path,
    out: str | Path,
    *,
    bits: int | None = None,
    device: str = "auto",
    skip_corrupt: bool = False,
    size: int | None = None,
    limit: int | None = None,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_file_mb: int = DEFAULT_MAX_FILE_MB,
    source_format: str = "auto",
    _remote: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Prepare `dataset` from `source` into `out`; returns the manifest written to `out/manifest.json`.

    bits: 8 or 5 (None: the recipe's default, 5 for CelebA HQ / FFHQ). size: stored side, only for
    `image-folder`. limit: keep the first N images of each split (for tests and smoke runs).
    skip_corrupt: skip undecodable images and record them, instead of failing.
    source: a directory or file, or s3://bucket/prefix (fetched first; the manifest records each object's
    key, ETag and size). source_format: for a dataset offered in several formats (ImageNet 32: 'tfrecord', the
    authors', or 'npz'), the one to read; 'auto' picks whichever the source holds.
    """
    recipe = get_recipe(dataset)
    _check_format(recipe, source_format)
    bits = recipe.default_bits if bits is None else bits
    if bits not in ALLOWED_BITS:
        raise DataError(f"bits={bits} is not supported; choose one of: {', '.join(map(str, ALLOWED_BITS))}")
    side = _stored_size(recipe, size)
    if limit is not None and limit < 1:
        raise DataError(f"limit={limit} must be a positive number of images per split")
    out = Path(out).expanduser().absolute()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: output already exists (pass --overwrite to replace it)")
    dali_device = resolve_device(device)

    start = time.perf_counter()
    if is_s3_uri(source):  # fetched beside the output, read like a local source, then removed
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.source-", dir=out.parent) as fetched:
            objects = fetch_source(str(source), fetched)
            manifest = prepare(
                dataset, fetched, out, bits=bits, device=device, skip_corrupt=skip_corrupt, size=size,
                limit=limit, overwrite=overwrite, max_pixels=max_pixels, max_file_mb=max_file_mb,
                source_format=source_format, _remote={"uri": str(source), "objects": objects},
            )  # fmt: skip
        return manifest
    if max_pixels < 1 or max_file_mb < 1:
        raise DataError(f"max_pixels={max_pixels} and max_file_mb={max_file_mb} must be >= 1")
    src = _read_source(
        recipe, source, limit, max_file_mb << 20, source_format, side, max_pixels
    )  # checked first
    total = sum(_split_count(src, s) for s in src.splits)
    _check_free_space(out.parent, _stored_bytes(src, side, recipe.channels))
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        with progress_bar(
            total=total, unit="img", unit_scale=True, desc=f"prepare {dataset}", mininterval=1.0
        ) as bar:
            progress = _Progress(bar, files=list(src.files))
            splits = {}
            for split in src.splits:
                path = tmp / f"{split}.npy"
                extra = {}
                if isinstance(src, ArraySource) and split in src.whole:
                    index = tmp / f"{split}_index.npy"
                    n = _write_whole_split(src, split, path, index, recipe, side, bits, dali_device, bar)
                    extra = {"index": index.name, "index_sha256": file_sha256(index)}
                elif isinstance(src, ArraySource):
                    n = _write_array_split(src, split, path, recipe, side, bits, dali_device, bar)
                else:
                    limits = (max_pixels, max_file_mb)
                    n = _write_image_split(
                        src, split, path, side, bits, dali_device, recipe, skip_corrupt, progress, limits
                    )
                splits[split] = {
                    "file": path.name,
                    "count": n,
                    "bytes": path.stat().st_size,
                    "sha256": file_sha256(path),
                    **extra,
                }
        manifest = _manifest(recipe, src, splits, side, bits, dali_device, limit, progress)
        if _remote is not None:
            manifest["source"]["uri"] = _remote["uri"]
            manifest["source"]["objects"] = [
                {k: o[k] for k in ("key", "etag", "bytes")} for o in _remote["objects"]
            ]
        _write_sources_listing(tmp / SOURCES_NAME, progress.files)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    elapsed = time.perf_counter() - start
    counts = ", ".join(f"{s} {v['count']}" for s, v in splits.items())
    skipped = f", {len(progress.skipped)} skipped" if progress.skipped else ""
    log.info(
        "prepared %s: %s images (%s) of %dx%dx%d at %d bits on %s%s in %.1f s (%.0f images/s) -> %s",
        dataset,
        sum(v["count"] for v in splits.values()),
        counts,
        side,
        side,
        recipe.channels,
        bits,
        dali_device,
        skipped,
        elapsed,
        total / max(elapsed, 1e-9),
        out,
    )
    return manifest


def _stored_size(recipe: Recipe, size: int | None) -> int:
    if recipe.size is None:
        if size is None:
            raise DataError(f"dataset {recipe.name!r} needs a size (--size N, the stored side in pixels)")
        if recipe.sizes and size not in recipe.sizes:
            raise DataError(
                f"size={size} is not a size of {recipe.name!r}; choose one of: {', '.join(map(str, recipe.sizes))}"
            )
        if not 4 <= size <= 4096:
            raise DataError(f"size={size} is out of range; choose 4..4096")
        return size
    if size is not None and size != recipe.size:
        raise DataError(
            f"dataset {recipe.name!r} is stored at {recipe.size}x{recipe.size}; size={size} is not allowed"
        )
    return recipe.size


def check_source(dataset: str, source: str | Path, source_format: str = "auto") -> None:
    """Raise DataError unless `source` reads as `dataset`'s raw data (its first image of each split)."""
    recipe = get_recipe(dataset)
    _check_format(recipe, source_format)
    # The side only shapes the decoded images, read later; a check reads no image data.
    _read_source(
        recipe, source, 1, source_format=source_format, size=recipe.size or min(recipe.sizes, default=32)
    )


def _check_format(recipe: Recipe, source_format: str) -> None:
    if source_format == "auto" or source_format in recipe.formats:
        return
    if not recipe.formats:
        raise DataError(
            f"format={source_format!r}: dataset {recipe.name!r} has one source format; use 'auto'"
        )
    raise DataError(
        f"format={source_format!r} is not a format of {recipe.name!r}; choose one of: auto, {', '.join(recipe.formats)}"
    )


def _check_free_space(folder: Path, needed: int) -> None:
    """DataError before writing when the arrays cannot fit (a full disk mid-write kills a memory map with
    SIGBUS, no message). Checked on the nearest existing folder, with 5 % and 64 MiB to spare."""
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if needed * 1.05 + (64 << 20) > free:
        raise DataError(
            f"{folder}: {needed / 2**30:.2f} GiB needed for the prepared arrays, {free / 2**30:.2f} GiB free"
        )


def _read_source(
    recipe: Recipe,
    source: str | Path,
    limit: int | None,
    max_bytes: int = DEFAULT_MAX_FILE_MB << 20,
    source_format: str = "auto",
    size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ArraySource | ImageSource:
    if recipe.source_kind == "idx":
        return read_idx_source(source, limit, max_bytes)
    if recipe.source_kind == "cifar10":
        return read_cifar10_source(source, limit)
    if recipe.source_kind in ("imagenet32", "imagenet64"):
        return read_imagenet32_source(source, limit, source_format, side=recipe.size or 32)
    if recipe.source_kind == "stacked-idx":
        return read_stacked_mnist_source(source, limit, max_bytes)
    if recipe.source_kind == "omniglot":
        return read_omniglot_source(source, limit, max_bytes)
    if recipe.source_kind == "lsun":
        return read_lsun_source(source, recipe.name, size, limit, max_bytes, max_pixels)
    return read_image_source(source, recipe, limit)


def _stored_bytes(src: ArraySource | ImageSource, side: int, channels: int) -> int:
    """What the splits will take on disk: S x S per image, or each image whole where a split is stored so."""
    whole = src.whole if isinstance(src, ArraySource) else {}
    return sum(
        sum(h * w for h, w in whole[s]) * channels
        if s in whole
        else _split_count(src, s) * side * side * channels
        for s in src.splits
    )


def _split_count(src: ArraySource | ImageSource, split: str) -> int:
    if isinstance(src, ArraySource):
        return sum(c.count for c in src.splits[split])
    return len(src.splits[split])


# ------------------------------------------------------------------------------------------- writing


def _write_array_split(
    src: ArraySource, split: str, path: Path, recipe: Recipe, side: int, bits: int, device: str, bar: Any
) -> int:
    """Run the decoded chunks of one split through DALI's bit reduction into `path`; returns the count."""
    shape = (side, side, recipe.channels)
    total = sum(c.count for c in src.splits[split])
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(total, *shape))
    pipe = ArrayPipeline(bits, device)
    at = 0
    for chunk in src.splits[split]:
        images = chunk.load()
        if images.shape[1:] != shape or len(images) != chunk.count:
            raise DataError(
                f"{chunk.name}: images have shape {images.shape[1:]} ({len(images)} of them); "
                f"{recipe.name} expects {shape} ({chunk.count})"
            )
        for i in range(0, len(images), pipe.batch_size):
            batch = pipe(images[i : i + pipe.batch_size])
            array[at : at + len(batch)] = batch
            at += len(batch)
            bar.update(len(batch))
    array.flush()
    del array
    return at


def _write_whole_split(
    src: ArraySource,
    split: str,
    path: Path,
    index_path: Path,
    recipe: Recipe,
    side: int,
    bits: int,
    device: str,
    bar: Any,
) -> int:
    """A split stored whole along the longer side (`data.strips`): each image's bytes end to end in `path`, its
    offset and size in `index_path`, bits reduced by DALI as in `_write_array_split`; returns the count."""
    from data.strips import check_strips

    c = recipe.channels
    sizes = np.array(src.whole[split], dtype=np.int64).reshape(-1, 2)
    nbytes = sizes[:, 0] * sizes[:, 1] * c
    index = np.column_stack([np.concatenate([[0], np.cumsum(nbytes)[:-1]]), sizes]).astype(np.int64)
    data = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(int(nbytes.sum()),))
    pipe = ArrayPipeline(bits, device)
    at = 0
    for chunk in src.splits[split]:
        images = chunk.load()
        for i in range(0, len(images), pipe.batch_size):
            for image in pipe.ragged(images[i : i + pipe.batch_size]):
                if at >= len(index) or image.shape != (*index[at, 1:], c):
                    expected = tuple(index[at, 1:]) if at < len(index) else "none"
                    raise DataError(
                        f"{chunk.name}: image {at} is {image.shape}; its size was read as {expected}"
                    )
                offset = int(index[at, 0])
                data[offset : offset + image.size] = image.reshape(-1)
                at += 1
            bar.update(min(pipe.batch_size, len(images) - i))
    if at != len(index):
        raise DataError(f"{split}: {at} images decoded, {len(index)} listed")
    data.flush()
    del data
    np.save(index_path, index)
    check_strips(np.load(path, mmap_mode="r"), np.load(index_path), len(index), side, c, index_path)
    return at


def _read_batch(paths: list[Path], max_bytes: int) -> list[tuple[Path, bytes | DataError]]:
    out: list[tuple[Path, bytes | DataError]] = []
    for p in paths:
        try:
            out.append((p, read_encoded(p, max_bytes)))
        except DataError as exc:
            out.append((p, exc))
    return out


def _batches(
    paths: list[Path], batch_size: int, max_bytes: int
) -> Iterator[list[tuple[Path, bytes | DataError]]]:
    """Read the files of batch i+1 on a thread while batch i is being decoded."""
    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_read_batch, chunks[0], max_bytes) if chunks else None
        for k in range(len(chunks)):
            assert pending is not None
            batch = pending.result()
            pending = pool.submit(_read_batch, chunks[k + 1], max_bytes) if k + 1 < len(chunks) else None
            yield batch


def _write_image_split(
    src: ImageSource,
    split: str,
    path: Path,
    side: int,
    bits: int,
    device: str,
    recipe: Recipe,
    skip_corrupt: bool,
    progress: _Progress,
    limits: tuple[int, int] = (DEFAULT_MAX_PIXELS, DEFAULT_MAX_FILE_MB),
) -> int:
    """Decode, crop, resize and reduce one split's images with DALI into `path`; returns the count kept."""
    paths = src.splits[split]
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(len(paths), side, side, 3))
    pipe = ImagePipeline(side, bits, device, crop_rel=recipe.crop_rel)

    def reject(p: Path, reason: str) -> None:
        if not skip_corrupt:
            raise DataError(f"{p}: {reason}")
        log.warning("skipping %s: %s", p, reason)
        progress.skipped.append({"path": relative_name(src.root, p), "reason": reason})

    at = 0
    for batch in _batches(paths, pipe.batch_size, limits[1] << 20):
        good: list[tuple[Path, bytes]] = []
        for p, data in batch:
            if isinstance(data, DataError):
                reject(p, str(data).removeprefix(f"{p}: "))
                continue
            reason = check_encoded(data, limits[0])
            if reason:
                reject(p, reason)
                continue
            good.append((p, data))
            progress.files.append(SourceFile(relative_name(src.root, p), len(data), sha256_bytes(data)))
        if good:
            images, kept, failures = pipe(good)
            for failure in failures:
                progress.files = [
                    f for f in progress.files if f.path != relative_name(src.root, failure.path)
                ]
                reject(failure.path, failure.reason)
            array[at : at + len(images)] = images
            at += len(images)
        progress.bar.update(len(batch))
    array.flush()
    del array
    if at < len(paths):
        _shrink(path, at)
    if at == 0 and paths:
        raise DataError(f"{src.root}: no usable image in split {split!r} (all {len(paths)} skipped)")
    if not paths:
        log.warning("split %r of %s is empty", split, src.root)
    return at


def _shrink(path: Path, count: int) -> None:
    """Rewrite an .npy file keeping only its first `count` rows (after images were skipped)."""
    old = np.load(path, mmap_mode="r")
    with atomic_path(path, suffix=".shrink") as tmp:
        new = np.lib.format.open_memmap(tmp, mode="w+", dtype=old.dtype, shape=(count, *old.shape[1:]))
        step = 4096
        for i in range(0, count, step):
            new[i : i + step] = old[i : min(i + step, count)]
        new.flush()
        del new
    del old


# ------------------------------------------------------------------------------------------ manifest


def _tool_versions() -> dict[str, str]:
    import nvidia.dali

    try:
        ours = importlib.metadata.version("nvae-pipeline")
    except importlib.metadata.PackageNotFoundError:
        ours = "unknown"
    return {
        "nvae-pipeline": ours,
        "nvidia-dali": nvidia.dali.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _sources_lines(files: list[SourceFile]) -> str:
    return "".join(f"{f.sha256}  {f.path}\n" for f in files)


def _write_sources_listing(path: Path, files: list[SourceFile]) -> None:
    path.write_text(_sources_lines(files))


def _manifest(
    recipe: Recipe,
    src: ArraySource | ImageSource,
    splits: dict[str, dict[str, Any]],
    side: int,
    bits: int,
    device: str,
    limit: int | None,
    progress: _Progress,
) -> dict[str, Any]:
    files = progress.files
    source: dict[str, Any] = {
        "kind": recipe.source_kind,
        "file_count": len(files),
        "bytes": sum(f.bytes for f in files),
        "listing": SOURCES_NAME,
        "listing_sha256": hashlib.sha256(_sources_lines(files).encode()).hexdigest(),
    }
    if isinstance(src, ArraySource) and src.format:
        source["format"] = src.format
    if isinstance(src, ArraySource):
        source.update(src.params)
    if len(files) <= INLINE_SOURCE_LIMIT:
        source["files"] = [{"path": f.path, "bytes": f.bytes, "sha256": f.sha256} for f in files]
    return {
        "format_version": FORMAT_VERSION,
        "dataset": recipe.name,
        "shape": [side, side, recipe.channels],
        "dtype": "uint8",
        "bits": bits,
        "max_value": 2**bits - 1,
        "splits": splits,
        "flip": recipe.flip,
        "binarize": recipe.binarize,
        "recipe": recipe.to_json(),
        "limit": limit,
        "device": device,
        "skipped": progress.skipped,
        "source": source,
        "tools": _tool_versions(),
    }


# ---------------------------------------------------------------------------------------- atomicity


def _remove_stale_partials(out: Path) -> None:
    """Remove temporary directories left by runs of this output that were killed (their pid is gone)."""
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("removing %s left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)
        except PermissionError:
            pass


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished temporary directory to `out`, replacing an existing one last."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    out.rename(old)
    tmp.rename(out)
    with contextlib.suppress(OSError):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
