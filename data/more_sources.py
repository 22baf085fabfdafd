"""Readers of the datasets the authors' code trains on beyond the paper's tables: stacked MNIST (built from the
MNIST idx files), OMNIGLOT (Burda et al.'s `chardata.mat`) and the LSUN scene categories (LSUN's LMDBs of
encoded images).

Each returns an `ArraySource` of uint8 (N, H, W, C) chunks, read lazily, in the order the authors' loaders
index them, and checks what it reads: a bad file is one `DataError` naming it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from common.errors import DataError
from data.sources import (
    DEFAULT_MAX_FILE_MB,
    DEFAULT_MAX_PIXELS,
    ArrayChunk,
    ArraySource,
    SourceFile,
    _find_one,
    describe_file,
    inside,
    read_idx_file,
    relative_name,
    source_root,
)

# ------------------------------------------------------------------------------------------ stacked MNIST

# Stacked MNIST (the authors' `StackedMNIST`): image k of a split takes its R, G and B channels from three MNIST
# digits of that split, chosen by three index vectors, each two random permutations of the split laid end to
# end, so a split holds twice as many images as MNIST's (120,000 train, 20,000 test) and 1,000 digit triples
# ("modes"). The authors draw the permutations from the unseeded global NumPy generator, a new set at each run;
# we draw them from a seeded one, so that a prepared copy is reproducible. The seed is in the manifest.
STACKED_MNIST_SEED = 2020
STACKED_CHUNK_IMAGES = 1 << 15
_SPLIT_STREAM = {"train": 0, "test": 1}


def stacked_mnist_indices(n: int, seed: int, split: str) -> np.ndarray:
    """(2n, 3) int64: for each stacked image, the MNIST index of its R, G and B digit (the authors' rule:
    per channel, two permutations of range(n) laid end to end; channel by channel, as they draw them)."""
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    columns = [np.hstack([rng.permutation(n), rng.permutation(n)]) for _ in range(3)]
    return np.stack(columns, axis=1)


def stack_digits(digits: np.ndarray, index: np.ndarray) -> np.ndarray:
    """uint8 (len(index), H, W, 3) from (N, H, W, 1) digits and an (M, 3) index."""
    return np.ascontiguousarray(digits[index, :, :, 0].transpose(0, 2, 3, 1))


def read_stacked_mnist_source(
    source: str | Path,
    limit: int | None,
    max_bytes: int = DEFAULT_MAX_FILE_MB << 20,
    seed: int = STACKED_MNIST_SEED,
) -> ArraySource:
    """Stacked MNIST from MNIST's idx files (a directory, plain or .gz). With `limit`, the first `limit` stacked
    images of each split: the same images a full preparation starts with."""
    root = source_root(source)
    if not root.is_dir():
        raise DataError(f"{root}: expected a directory holding MNIST's idx files")
    stems = {
        "train": (("train-images-idx3-ubyte", "train-images.idx3-ubyte"), "training-image"),
        "test": (("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"), "test-image"),
    }
    splits: dict[str, list[ArrayChunk]] = {}
    files: list[SourceFile] = []
    for split, (names, what) in stems.items():
        path = _find_one(root, names, what)
        digits = read_idx_file(path, max_bytes)
        if digits.shape[1:] != (28, 28, 1):
            raise DataError(f"{path}: images are {digits.shape[1]}x{digits.shape[2]}; MNIST's are 28x28")
        index = stacked_mnist_indices(len(digits), seed, split)[:limit]
        splits[split] = [
            ArrayChunk(
                len(index[i : i + STACKED_CHUNK_IMAGES]),
                lambda d=digits, ix=index[i : i + STACKED_CHUNK_IMAGES]: stack_digits(d, ix),
                f"{path.name} stacked [{i}:{i + STACKED_CHUNK_IMAGES}]",
            )
            for i in range(0, len(index), STACKED_CHUNK_IMAGES)
        ]
        files.append(describe_file(root, path))
    return ArraySource(splits, files, params={"stacked_mnist_seed": seed})


# ---------------------------------------------------------------------------------------------- OMNIGLOT

OMNIGLOT_FILE = "chardata.mat"
OMNIGLOT_URL = "https://raw.github.com/yburda/iwae/master/datasets/OMNIGLOT/chardata.mat"
_OMNIGLOT_KEYS = {"train": "data", "test": "testdata"}


def omniglot_images(values: np.ndarray, name: str) -> np.ndarray:
    """chardata.mat's (784, N) array of intensities in [0, 1] -> uint8 (N, 28, 28, 1), as the authors'
    `load_omniglot`: 255 * v truncated to uint8, pixels in column-major order (reshape (28, 28, N), then
    transpose (2, 1, 0))."""
    if values.ndim != 2 or values.shape[0] != 28 * 28 or values.shape[1] == 0:
        raise DataError(f"{name}: has shape {values.shape}; expected (784, N), one 28x28 image per column")
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise DataError(f"{name}: holds {values.dtype} values; expected real numbers in [0, 1]")
    v = values.astype(np.float32)
    if not np.isfinite(v).all() or v.min() < 0 or v.max() > 1:
        raise DataError(f"{name}: values outside [0, 1] (min {np.nanmin(v):g}, max {np.nanmax(v):g})")
    images = (255 * v).reshape(28, 28, -1).transpose(2, 1, 0).astype(np.uint8)
    return np.ascontiguousarray(images[..., None])


def read_omniglot_source(
    source: str | Path, limit: int | None, max_bytes: int = DEFAULT_MAX_FILE_MB << 20
) -> ArraySource:
    """OMNIGLOT from Burda et al.'s chardata.mat (the file itself, or a directory holding it): 'data' is the
    training split, 'testdata' the test split."""
    from scipy.io import loadmat  # scipy reads MATLAB files; a dependency of the data extra

    root = source_root(source)
    path = root if root.is_file() else inside(root, root / OMNIGLOT_FILE)
    base = root.parent if root.is_file() else root
    if not path.is_file():
        raise DataError(f"{path}: no {OMNIGLOT_FILE} (Burda et al.'s OMNIGLOT split: {OMNIGLOT_URL})")
    size = path.stat().st_size
    if size > max_bytes:
        raise DataError(
            f"{path}: file of {size / 2**20:.0f} MiB, over the limit of {max_bytes >> 20} MiB (--max-file-mb)"
        )
    try:
        mat = loadmat(str(path), variable_names=list(_OMNIGLOT_KEYS.values()))
    except Exception as exc:  # noqa: BLE001 - any failure of a foreign file is bad input
        raise DataError(f"{path}: not a readable MATLAB file: {type(exc).__name__}: {exc}") from None
    splits: dict[str, list[ArrayChunk]] = {}
    for split, key in _OMNIGLOT_KEYS.items():
        if key not in mat:
            raise DataError(f"{path}: no {key!r} array (chardata.mat holds 'data' and 'testdata')")
        images = omniglot_images(np.asarray(mat[key]), f"{path}:{key}")[:limit]
        splits[split] = [ArrayChunk(len(images), lambda a=images: a, f"{path.name}:{key}")]
    return ArraySource(splits, [describe_file(base, path)])


# -------------------------------------------------------------------------------------------------- LSUN

# LSUN's scene categories come as LMDBs, `<category>_train_lmdb` and `<category>_val_lmdb` (the unpacked
# `<category>_train_lmdb.zip` of LSUN's download script), each holding encoded images (WebP) under sorted keys.
# The authors read them with torchvision's LSUN class (in key order), `Image.open(...).convert('RGB')`, train
# after `Resize(size)` and `RandomCrop(size)` and evaluate on the val LMDB after `Resize(size)` and
# `CenterCrop(size)`. The test split is stored centre-cropped; the training split is stored resized but whole
# (`data.strips`), so that training takes a new random crop along the longer side each epoch.
LSUN_CATEGORIES = {"lsun-bedroom": "bedroom", "lsun-church": "church_outdoor", "lsun-tower": "tower"}
LSUN_SPLITS = {"train": "train", "test": "val"}
LSUN_CHUNK_IMAGES = 1 << 12


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after torchvision's `Resize(size)`: the shorter side becomes `size`, the longer
    `int(size * long / short)`."""
    if min(width, height) == size:
        return width, height
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def resize_shorter(image, size: int):
    """torchvision's `Resize(size)` on a PIL image, as its PIL path computes it (bilinear)."""
    from PIL import Image

    new = resized_size(*image.size, size)
    return image if new == image.size else image.resize(new, Image.BILINEAR)


def resize_center_crop(image, size: int):
    """torchvision's `Resize(size)` then `CenterCrop(size)` on a PIL image: `resize_shorter`, then the central
    square, its offsets rounded."""
    from data.strips import centre_offset

    image = resize_shorter(image, size)
    w, h = image.size
    top, left = centre_offset(h, size), centre_offset(w, size)
    return image.crop((left, top, left + size, top + size))


def _open_record(data: bytes, name: str, max_pixels: int):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{name}: not a decodable image: {exc}") from None
    if img.width * img.height > max_pixels:
        img.close()
        raise DataError(
            f"{name}: image of {img.width}x{img.height} pixels, over the limit of {max_pixels} (--max-pixels)"
        )
    return img


def decode_lsun(
    data: bytes, size: int, name: str, max_pixels: int = DEFAULT_MAX_PIXELS, crop: bool = True
) -> np.ndarray:
    """One LSUN record -> uint8 (size, size, 3), centre-cropped, or with `crop` False the resized image whole
    (H, W, 3), min(H, W) = size; DataError naming the record when it does not decode."""
    from PIL import Image

    with _open_record(data, name, max_pixels) as img:
        try:
            rgb = img.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"{name}: not a decodable image: {exc}") from None
    image = resize_center_crop(rgb, size) if crop else resize_shorter(rgb, size)
    return np.asarray(image, dtype=np.uint8)


def _open_lmdb(path: Path):
    import lmdb  # LSUN's own format; a dependency of the data extra

    if not (path / "data.mdb").is_file():
        raise DataError(f"{path}: not an LMDB folder (no data.mdb)")
    try:
        return lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False, max_readers=1)
    except lmdb.Error as exc:
        raise DataError(f"{path}: cannot open the LMDB: {exc}") from None


def lmdb_keys(path: Path) -> list[bytes]:
    """The keys of an LMDB, in its (sorted) order: the order torchvision's LSUN indexes it."""
    import lmdb

    env = _open_lmdb(path)
    try:
        with env.begin(write=False) as txn:
            return [bytes(k) for k in txn.cursor().iternext(keys=True, values=False)]
    except lmdb.Error as exc:
        raise DataError(f"{path}: cannot read the LMDB: {exc}") from None
    finally:
        env.close()


def _decode_records(
    path: Path, keys: list[bytes], size: int, max_bytes: int, max_pixels: int, crop: bool = True
) -> np.ndarray | list[np.ndarray]:
    """The records `keys` decoded: uint8 (N, size, size, 3) centre squares, or with `crop` False a list of the
    resized images whole."""
    env = _open_lmdb(path)
    out: np.ndarray | list = np.empty((len(keys), size, size, 3), np.uint8) if crop else [None] * len(keys)
    try:
        with env.begin(write=False, buffers=True) as txn:
            for i, key in enumerate(keys):
                value = txn.get(key)
                name = f"{path.name}[{key.decode(errors='replace')}]"
                if value is None:
                    raise DataError(f"{name}: record vanished while reading")
                if len(value) > max_bytes:
                    raise DataError(
                        f"{name}: record of {len(value) >> 20} MiB, over --max-file-mb {max_bytes >> 20}"
                    )
                out[i] = decode_lsun(bytes(value), size, name, max_pixels, crop)
    finally:
        env.close()
    return out


def read_lsun_source(
    source: str | Path,
    dataset: str,
    size: int,
    limit: int | None,
    max_bytes: int = DEFAULT_MAX_FILE_MB << 20,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ArraySource:
    """One LSUN category from a folder holding its `<category>_train_lmdb` and `<category>_val_lmdb` (val is our
    test split), each image resized to a shorter side of `size`: test images centre-cropped to `size`, training
    images kept whole (`ArraySource.whole`) for a random crop each epoch."""
    category = LSUN_CATEGORIES[dataset]
    root = source_root(source)
    if not root.is_dir():
        raise DataError(f"{root}: expected a folder holding {category}_train_lmdb and {category}_val_lmdb")
    splits: dict[str, list[ArrayChunk]] = {}
    files: list[SourceFile] = []
    whole: dict[str, list[tuple[int, int]]] = {}
    for split, theirs in LSUN_SPLITS.items():
        folder = root / f"{category}_{theirs}_lmdb"
        if not folder.is_dir():
            raise DataError(
                f"{folder}: missing (LSUN's {category}_{theirs}_lmdb.zip, unpacked; https://www.yf.io/p/lsun)"
            )
        folder = inside(root, folder)
        keys = lmdb_keys(folder)[:limit]
        if not keys:
            raise DataError(f"{folder}: the LMDB holds no records")
        data = inside(root, folder / "data.mdb")
        crop = split != "train"
        digest, sizes = _lmdb_digest(folder, keys, None if crop else (size, max_pixels))
        files.append(SourceFile(relative_name(root, data), data.stat().st_size, digest))
        if not crop:
            whole[split] = sizes
        splits[split] = [
            ArrayChunk(
                len(part),
                lambda p=folder, k=part, c=crop: _decode_records(p, k, size, max_bytes, max_pixels, c),
                f"{folder.name} [{i}:{i + len(part)}]",
            )
            for i in range(0, len(keys), LSUN_CHUNK_IMAGES)
            for part in [keys[i : i + LSUN_CHUNK_IMAGES]]
        ]
    params = {
        "lsun_category": category,
        "transform": f"train: resize shorter side to {size}, stored whole, a random {size} crop each epoch; "
        f"test: resize shorter side to {size}, centre crop {size}",
    }
    return ArraySource(splits, files, params=params, whole=whole)


def _lmdb_digest(
    path: Path, keys: list[bytes], sizes_at: tuple[int, int] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """SHA-256 over the records read (key length, key, value length, value, in order): the LMDB file itself
    holds free pages and changes when rewritten with the same records. With `sizes_at` = (size, max_pixels),
    also each record's (height, width) after `Resize(size)`, from its header (no decode)."""
    import hashlib

    digest, sizes = hashlib.sha256(), []
    env = _open_lmdb(path)
    try:
        with env.begin(write=False, buffers=True) as txn:
            for key in keys:
                value = txn.get(key)
                value = b"" if value is None else bytes(value)
                for part in (key, value):
                    digest.update(len(part).to_bytes(8, "big"))
                    digest.update(part)
                if sizes_at is not None:
                    name = f"{path.name}[{key.decode(errors='replace')}]"
                    with _open_record(value, name, sizes_at[1]) as img:
                        w, h = resized_size(img.width, img.height, sizes_at[0])
                    sizes.append((h, w))
    finally:
        env.close()
    return digest.hexdigest(), sizes
