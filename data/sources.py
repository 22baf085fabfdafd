"""Readers of the raw dataset formats: idx, CIFAR-10 pickles, ImageNet 32 (Glow's TFRecords, the authors', or
Chrabaszcz et al.'s npz batches), and image folders.

Every reader checks what it reads and raises `DataError` naming the file and what was wrong. Nothing here
follows a path out of the source directory (a symlink escaping it is rejected), and CIFAR pickles go through
an unpickler that can only rebuild the handful of types a CIFAR batch consists of.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import logging
import os
import pickle
import re
import shutil
import tarfile
import tempfile
import weakref
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DataError
from common.files import file_sha256
from common.progress import progress as progress_bar
from data.dali_ops import TFRecordImages, cpu_threads
from data.recipes import CELEBA_PARTITION_BOUNDS, TRAIN_FRACTION, Recipe
from data.tfrecord import glow_shards, has_glow_shards, make_indexes

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
IDX_UBYTE_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions (N, rows, cols)
CIFAR_ROW = 3 * 32 * 32


@dataclass(frozen=True)
class SourceFile:
    """Provenance of one input file: its path relative to the source root, size and SHA-256."""

    path: str
    bytes: int
    sha256: str


@dataclass
class ArrayChunk:
    """`count` images that `load()` returns as uint8 (count, H, W, C), or as a list of (H, W, C) arrays in a split
    stored whole (`ArraySource.whole`); loaded lazily to bound memory."""

    count: int
    load: Callable[[], np.ndarray]
    name: str


@dataclass
class ArraySource:
    """An already-decoded source: per split, the chunks in order, plus the files they came from, for a
    dataset offered in several formats the one read, and what else the manifest should record of how the
    images were made (`params`). `whole`: the splits whose images are stored whole along their longer side
    for a random crop each epoch (`data.strips`), with each image's (height, width) in order."""

    splits: dict[str, list[ArrayChunk]]
    files: list[SourceFile] = field(default_factory=list)
    format: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    whole: dict[str, list[tuple[int, int]]] = field(default_factory=dict)


@dataclass
class ImageSource:
    """An encoded-image source: per split, image paths in a fixed order, plus metadata files read."""

    root: Path
    splits: dict[str, list[Path]]
    files: list[SourceFile] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- paths


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source_root(source: str | Path) -> Path:
    """The resolved source path; DataError if it does not exist."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{path}: source path does not exist")
    return path.resolve()


def inside(root: Path, path: Path) -> Path:
    """`path` resolved, checked to stay inside `root` (already resolved); DataError for escaping symlinks."""
    resolved = path.resolve()
    if resolved != root and not resolved.is_relative_to(root):
        raise DataError(f"{path}: symlink points outside the source directory {root} (to {resolved})")
    return resolved


def relative_name(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def describe_file(root: Path, path: Path) -> SourceFile:
    return SourceFile(relative_name(root, path), path.stat().st_size, file_sha256(path))


# ------------------------------------------------------------------------------------------------- idx


def parse_idx_images(raw: bytes, name: str) -> np.ndarray:
    """Images of an idx3-ubyte file as uint8 (N, rows, cols, 1); DataError on a bad magic or size."""
    if len(raw) < 16:
        raise DataError(f"{name}: too short for an idx header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[0:4], "big")
    if magic != IDX_UBYTE_IMAGES_MAGIC:
        raise DataError(
            f"{name}: wrong idx magic number 0x{magic:08x} (expected 0x{IDX_UBYTE_IMAGES_MAGIC:08x}, "
            "unsigned-byte images with 3 dimensions)"
        )
    n, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
    expected = 16 + n * rows * cols
    if n == 0 or rows == 0 or cols == 0:
        raise DataError(f"{name}: idx header declares an empty array ({n} x {rows} x {cols})")
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(
            f"{name}: {what}: header declares {n} images of {rows}x{cols} ({expected} bytes), "
            f"file holds {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols, 1)


# Size limits for what a source may make us hold in memory (prepare's --max-file-mb and --max-pixels).
DEFAULT_MAX_FILE_MB = 256  # one file's bytes, after decompression (an idx file of MNIST is 47 MB)
DEFAULT_MAX_PIXELS = 50_000_000  # pixels of one image (FFHQ and CelebA HQ are 1 Mpx)


def read_idx_file(path: Path, max_bytes: int = DEFAULT_MAX_FILE_MB << 20) -> np.ndarray:
    """Read a plain or gzip-compressed idx image file as uint8 (N, rows, cols, 1). Decompression stops at the
    size the header declares (plus one byte, to detect trailing data), and at `max_bytes`."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            stream = gzip.GzipFile(fileobj=f) if head == b"\x1f\x8b" else f
            header = stream.read(16)
            declared = 16
            if len(header) == 16:
                n, rows, cols = (int.from_bytes(header[i : i + 4], "big") for i in (4, 8, 12))
                declared = 16 + n * rows * cols
            if declared > max_bytes:
                raise DataError(
                    f"{path}: header declares {declared / 2**20:.0f} MiB of images, over the limit of "
                    f"{max_bytes >> 20} MiB (--max-file-mb)"
                )
            raw = header + stream.read(declared - len(header) + 1)
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read idx file: {exc}") from None
    return parse_idx_images(raw, str(path))


def _find_one(root: Path, stems: tuple[str, ...], what: str) -> Path:
    for stem in stems:
        for suffix in ("", ".gz"):
            candidate = root / f"{stem}{suffix}"
            if candidate.is_file():
                return inside(root, candidate)
    raise DataError(f"{root}: no {what} idx file (looked for {', '.join(s + '[.gz]' for s in stems)})")


def read_idx_source(
    source: str | Path, limit: int | None, max_bytes: int = DEFAULT_MAX_FILE_MB << 20
) -> ArraySource:
    """MNIST-style idx source: a directory with train/t10k image files, plain or .gz."""
    root = source_root(source)
    if not root.is_dir():
        raise DataError(f"{root}: expected a directory holding the idx files")
    paths = {
        "train": _find_one(root, ("train-images-idx3-ubyte", "train-images.idx3-ubyte"), "training-image"),
        "test": _find_one(root, ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"), "test-image"),
    }
    splits: dict[str, list[ArrayChunk]] = {}
    files = []
    for split, path in paths.items():
        images = read_idx_file(path, max_bytes)[:limit]
        splits[split] = [ArrayChunk(len(images), lambda a=images: a, path.name)]
        files.append(describe_file(root, path))
    return ArraySource(splits, files)


# -------------------------------------------------------------------------------------------- CIFAR-10


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild only dicts, lists, bytes, str, numbers and plain numpy arrays."""

    _RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy's ndarray rebuild function, wherever it lives
    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # bytes pickled by Python 3 at protocol 2
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def parse_cifar_batch(raw: bytes, name: str) -> np.ndarray:
    """One CIFAR-10 python batch as uint8 (N, 32, 32, 3); DataError unless it has the expected structure."""
    try:
        obj = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # any failure of untrusted bytes is bad input, not a bug
        raise DataError(f"{name}: not a CIFAR-10 python batch: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{name}: expected a dict with a 'data' entry, got {type(obj).__name__}")
    data = obj.get(b"data", obj.get("data"))
    if not isinstance(data, np.ndarray):
        raise DataError(f"{name}: no numpy array under 'data' (found {type(data).__name__})")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_ROW or data.shape[0] == 0:
        raise DataError(
            f"{name}: 'data' has shape {data.shape} and dtype {data.dtype}; expected (N, {CIFAR_ROW}) uint8"
        )
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


_CIFAR_MEMBERS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _read_cifar_tar(path: Path) -> dict[str, bytes]:
    wanted = {n for names in _CIFAR_MEMBERS.values() for n in names}
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if base not in wanted:
                    continue
                if not member.isfile():
                    raise DataError(f"{path}: member {member.name} is not a regular file (links are refused)")
                fobj = tar.extractfile(member)
                assert fobj is not None
                found[base] = fobj.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read tar archive: {exc}") from None
    return found


def read_cifar10_source(source: str | Path, limit: int | None) -> ArraySource:
    """CIFAR-10 python batches, from the extracted directory or the .tar.gz itself."""
    root = source_root(source)
    if root.is_file():
        raw = _read_cifar_tar(root)
        label = root.name
        files = [describe_file(root.parent, root)]
    else:
        base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
        raw, files = {}, []
        for names in _CIFAR_MEMBERS.values():
            for n in names:
                p = base / n
                if p.is_file():
                    p = inside(root, p)
                    raw[n] = p.read_bytes()
                    files.append(SourceFile(relative_name(root, base / n), len(raw[n]), sha256_bytes(raw[n])))
        label = str(base)
    missing = [n for names in _CIFAR_MEMBERS.values() for n in names if n not in raw]
    if missing:
        raise DataError(f"{label}: missing CIFAR-10 batches: {', '.join(missing)}")
    splits: dict[str, list[ArrayChunk]] = {}
    for split, names in _CIFAR_MEMBERS.items():
        arrays = [parse_cifar_batch(raw[n], f"{label}/{n}") for n in names]
        images = np.concatenate(arrays)[:limit]
        splits[split] = [ArrayChunk(len(images), lambda a=images: a, split)]
    return ArraySource(splits, files)


# ------------------------------------------------------------------------------------------ ImageNet 32

_NPZ_TRAIN = re.compile(r"train_data_batch_\d+(\.npz)?")
TFRECORD_CHUNK_IMAGES = 1 << 16  # shards read per DALI pipeline: about 200 MB of 32x32 images


def _npz_data_count(path: Path, side: int = 32) -> int:
    """Number of images in an ImageNet-32 npz batch, from the array header alone (no full load)."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("data.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except KeyError:
        raise DataError(f"{path}: npz has no 'data' array") from None
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable npz file: {exc}") from None
    row = 3 * side * side
    if dtype != np.uint8 or len(shape) != 2 or shape[1] != row or fortran:
        raise DataError(f"{path}: 'data' has shape {shape} and dtype {dtype}; expected (N, {row}) uint8")
    return int(shape[0])


def _load_npz_images(path: Path, side: int = 32) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = npz["data"]
    except (OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{path}: cannot load 'data': {exc}") from None
    return np.ascontiguousarray(data.reshape(-1, 3, side, side).transpose(0, 2, 3, 1))


def read_imagenet32_source(
    source: str | Path, limit: int | None, source_format: str = "auto", side: int = 32
) -> ArraySource:
    """Downsampled ImageNet 32x32 (or 64x64, `side`) from a directory, in one of two formats (`source_format`):

    - 'tfrecord', the authors': van den Oord et al.'s images as Glow's TFRecords (imagenet-oord-tfr.tar),
      train/train-r05-s-<k>-of-2000.tfrecords and validation/validation-r05-s-<k>-of-0080.tfrecords (r06 at 64);
    - 'npz': Chrabaszcz et al.'s batches train_data_batch_<k>.npz and val_data.npz (downsampled otherwise);
    - 'auto': whichever of the two the directory holds.
    """
    root = source_root(source)
    if not root.is_dir():
        raise DataError(f"{root}: expected a directory holding ImageNet {side} TFRecords or npz batches")
    if source_format == "auto":
        source_format = _imagenet32_format(root, side)
    if source_format == "tfrecord":
        return read_imagenet32_tfrecords(root, limit, side)
    if source_format == "npz":
        return read_imagenet32_npz(root, limit, side)
    raise DataError(f"unknown ImageNet {side} format {source_format!r}; choose one of: auto, tfrecord, npz")


def _imagenet32_format(root: Path, side: int = 32) -> str:
    tfrecord = has_glow_shards(root, side)
    npz = any(_NPZ_TRAIN.fullmatch(p.name) for p in root.iterdir())
    if tfrecord and npz:
        raise DataError(
            f"{root}: holds both TFRecords and npz batches of ImageNet {side}; choose with --format"
        )
    if not (tfrecord or npz):
        res = f"r{side.bit_length() - 1:02d}"
        raise DataError(
            f"{root}: no ImageNet {side} found: expected Glow's TFRecords (train/train-{res}-s-*-of-*.tfrecords and "
            f"validation/validation-{res}-s-*-of-*.tfrecords, from imagenet-oord-tfr.tar; the authors' data) or "
            "Chrabaszcz et al.'s npz batches (train_data_batch_*.npz and val_data.npz)"
        )
    return "tfrecord" if tfrecord else "npz"


def read_imagenet32_npz(root: Path, limit: int | None, side: int = 32) -> ArraySource:
    """Chrabaszcz et al.'s ImageNet 32x32 (or 64x64): train_data_batch_<k>.npz (k = 1..10) and val_data.npz."""

    def batch_key(p: Path) -> int:
        return int(re.findall(r"\d+", p.stem)[-1])

    train = sorted((p for p in root.iterdir() if _NPZ_TRAIN.fullmatch(p.name)), key=batch_key)
    val = [p for p in (root / "val_data.npz", root / "val_data") if p.is_file()][:1]
    if not train:
        raise DataError(f"{root}: no train_data_batch_*.npz files")
    if not val:
        raise DataError(f"{root}: no val_data.npz file")
    splits: dict[str, list[ArrayChunk]] = {}
    files = []
    for split, paths in (("train", train), ("test", val)):
        chunks, remaining = [], limit
        for p in paths:
            p = inside(root, p)
            count = _npz_data_count(p, side)
            files.append(describe_file(root, p))
            if remaining is not None:
                count = min(count, remaining)
                remaining -= count
            if count:
                chunks.append(ArrayChunk(count, lambda p=p, c=count: _load_npz_images(p, side)[:c], p.name))
        splits[split] = chunks
    return ArraySource(splits, files, format="npz")


def read_imagenet32_tfrecords(root: Path, limit: int | None, side: int = 32) -> ArraySource:
    """Glow's ImageNet 32 TFRecords under `root` (or its mnt/host/imagenet-oord-tfr): train, and validation
    as our 'test' split, each in shard order.

    Every shard read is indexed with DALI's tfrecord2idx into a temporary directory (the source may be
    read-only), removed with the returned source; with `limit`, only the shards that hold the first `limit`
    records are indexed and read.
    """
    shards = glow_shards(root, side)
    index_root = Path(tempfile.mkdtemp(prefix="nvae-tfrecord-index-"))
    try:
        reader = TFRecordImages(side)
        splits: dict[str, list[ArrayChunk]] = {}
        files: list[SourceFile] = []
        for split, paths in shards.items():
            used = _index_shards(root, [inside(root, p) for p in paths], index_root / split, limit)
            files += [describe_file(root, path) for path, _, _ in used]
            splits[split] = _tfrecord_chunks(used, reader, split)
    except BaseException:
        shutil.rmtree(index_root, ignore_errors=True)
        raise
    source = ArraySource(splits, files, format="tfrecord")
    weakref.finalize(source, shutil.rmtree, index_root, ignore_errors=True)
    return source


def _index_shards(
    root: Path, paths: list[Path], index_dir: Path, limit: int | None
) -> list[tuple[Path, Path, int]]:
    """(shard, its index file, records to read) for the shards that hold the first `limit` records (all
    without a limit), each indexed by tfrecord2idx into `index_dir` and checked."""
    pairs = [(p, index_dir / f"{p.name}.idx") for p in paths]
    used: list[tuple[Path, Path, int]] = []
    remaining = limit
    desc = f"index {relative_name(root, paths[0].parent)}"
    with progress_bar(total=len(pairs), desc=desc, unit="file", mininterval=1.0) as bar:
        for (path, index), count in zip(pairs, make_indexes(pairs, cpu_threads()), strict=False):
            bar.update(1)
            take = count if remaining is None else min(count, remaining)
            used.append((path, index, take))
            if remaining is not None:
                remaining -= take
                if remaining == 0:
                    break
    return used


def _tfrecord_chunks(
    used: list[tuple[Path, Path, int]], reader: TFRecordImages, split: str
) -> list[ArrayChunk]:
    """Consecutive shards grouped into chunks of up to TFRECORD_CHUNK_IMAGES images, one DALI read each."""
    groups: list[list[tuple[Path, Path, int]]] = [[]]
    for shard in used:
        if groups[-1] and sum(n for *_, n in groups[-1]) + shard[2] > TFRECORD_CHUNK_IMAGES:
            groups.append([])
        groups[-1].append(shard)
    chunks = []
    for group in groups:
        count = sum(n for *_, n in group)
        if not count:
            continue
        paths, indexes = [p for p, _, _ in group], [i for _, i, _ in group]
        name = f"{split}: {paths[0]}" + (f" .. {paths[-1].name}" if len(paths) > 1 else "")
        chunks.append(ArrayChunk(count, lambda p=paths, i=indexes, c=count: reader(p, i, c), name))
    return chunks


# --------------------------------------------------------------------------------------- image folders


def list_images(root: Path) -> list[Path]:
    """PNG/JPEG files under `root` (recursive), sorted by relative path; escaping symlinks are rejected.

    Hidden files and folders (names starting with '.', e.g. macOS `._x.jpg` resource forks) are ignored.
    """
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        filenames = [f for f in filenames if not f.startswith(".")]
        for d in dirnames:
            if (here / d).is_symlink():
                inside(root, here / d)  # raises when it escapes; in-tree targets are walked anyway
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                path = here / name
                if path.is_symlink():
                    inside(root, path)
                found.append(path)
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return found


def _fraction_split(paths: list[Path]) -> dict[str, list[Path]]:
    if len(paths) < 2:
        raise DataError(f"{paths[0].parent}: a train/test split needs at least 2 images, found {len(paths)}")
    n_train = min(round(len(paths) * TRAIN_FRACTION), len(paths) - 1)
    return {"train": paths[:n_train], "test": paths[n_train:]}


def _partition_split(root: Path, paths: list[Path]) -> tuple[dict[str, list[Path]], list[SourceFile]]:
    """CelebA's official partitions: list_eval_partition.txt when present, else the image numbers."""
    names = ("train", "valid", "test")
    splits: dict[str, list[Path]] = {n: [] for n in names}
    partition_file = root / "list_eval_partition.txt"
    if partition_file.is_file():
        partition_file = inside(root, partition_file)
        table: dict[str, int] = {}
        for lineno, line in enumerate(partition_file.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise DataError(f"{partition_file}:{lineno}: expected '<image name> <0|1|2>', got {line!r}")
            table[parts[0]] = int(parts[1])
        for p in paths:
            if p.name not in table:
                raise DataError(f"{p}: image not listed in {partition_file}")
            splits[names[table[p.name]]].append(p)
        return splits, [describe_file(root, partition_file)]
    last_train, last_valid = CELEBA_PARTITION_BOUNDS
    for p in paths:
        if not p.stem.isdigit():
            raise DataError(
                f"{p}: cannot place the image in a CelebA partition: name is not a number and "
                f"{partition_file} does not exist"
            )
        k = int(p.stem)
        splits["train" if k <= last_train else "valid" if k <= last_valid else "test"].append(p)
    return splits, []


def read_image_source(source: str | Path, recipe: Recipe, limit: int | None) -> ImageSource:
    """List and split an image folder per the recipe's split rule; `limit` keeps the first N per split."""
    root = source_root(source)
    if not root.is_dir():
        raise DataError(f"{root}: expected a directory of PNG/JPEG images")
    files: list[SourceFile] = []
    if recipe.split_rule == "subdirs" and (root / "train").is_dir() and (root / "test").is_dir():
        splits = {s: list_images(inside(root, root / s)) for s in ("train", "test")}
        for s, paths in splits.items():
            if not paths:
                raise DataError(f"{root / s}: no PNG/JPEG images found")
    else:
        paths = list_images(root)
        if not paths:
            raise DataError(f"{root}: no PNG/JPEG images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
        if recipe.split_rule == "partition":
            splits, files = _partition_split(root, paths)
        else:
            splits = _fraction_split(paths)
    if limit is not None:
        splits = {s: p[:limit] for s, p in splits.items()}
    return ImageSource(root, splits, files)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_encoded(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Why an encoded image is unusable (empty, unknown format, truncated, more than `max_pixels` pixels),
    or None if it looks whole.

    A cheap structural check before decoding: decoders often fill a truncated image with grey instead of
    failing, so the end-of-image marker (JPEG) or IEND chunk (PNG) must be present.
    """
    if not data:
        return "empty file"
    if data.startswith(b"\xff\xd8\xff"):
        if b"\xff\xd9" not in data.rstrip(b"\x00")[-4096:]:
            return "truncated JPEG (no end-of-image marker)"
    elif data.startswith(_PNG_SIGNATURE):
        if b"IEND" not in data[-64:]:
            return "truncated PNG (no IEND chunk)"
    else:
        return "not a PNG or JPEG file (unrecognised header)"
    return _too_many_pixels(data, max_pixels)


def _too_many_pixels(data: bytes, max_pixels: int) -> str | None:
    """Read only the header's size: a 20000x20000 PNG of a few KB would take GBs to decode."""
    from PIL import Image

    if data.startswith(_PNG_SIGNATURE) and data[12:16] == b"IHDR":  # width, height right after the tag
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    else:
        try:  # JPEG: PIL reads the frame header (and refuses over 2x its MAX_IMAGE_PIXELS, ~179 Mpx, itself)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
        except Image.DecompressionBombError:
            return f"image over PIL's decompression-bomb limit, far over --max-pixels {max_pixels}"
        except Exception:  # noqa: BLE001 - a header PIL cannot read: let the decoder report it
            return None
    if width * height > max_pixels:
        return f"image of {width}x{height} pixels, over the limit of {max_pixels} (--max-pixels)"
    return None


def read_encoded(path: Path, max_bytes: int = DEFAULT_MAX_FILE_MB << 20) -> bytes:
    """Bytes of one image file; DataError if it cannot be read or is larger than `max_bytes`."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise DataError(
                    f"{path}: file of {size / 2**20:.0f} MiB, over the limit of {max_bytes >> 20} MiB (--max-file-mb)"
                )
            return f.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None
