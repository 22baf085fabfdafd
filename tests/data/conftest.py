"""Fixtures of the data tests: idx files cut from the real Fashion-MNIST, and generated image folders.

Test modules cannot import this file, so the helpers are also offered as fixtures (`datagen`).
"""

from __future__ import annotations

import gzip
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def real_idx_images(name: str, count: int) -> np.ndarray:
    """The first `count` images of a real Fashion-MNIST idx file, uint8 (count, 28, 28)."""
    path = FASHION_MNIST / name
    if not path.exists():
        pytest.skip(f"{path} is not available")
    with gzip.open(path, "rb") as f:
        raw = f.read(16 + count * 28 * 28)
    return np.frombuffer(raw, np.uint8, offset=16).reshape(count, 28, 28)


def write_idx(path: Path, images: np.ndarray, *, magic: int = 0x00000803, compress: bool = True) -> Path:
    """Write uint8 (N, rows, cols) as an idx3-ubyte file, gzip-compressed when `compress`."""
    n, rows, cols = images.shape
    raw = magic.to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, rows, cols))
    raw += np.ascontiguousarray(images, np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw, mtime=0))
    else:
        path.write_bytes(raw)
    return path


def pattern(seed: int, height: int, width: int) -> np.ndarray:
    """A smooth, seed-dependent RGB test image uint8 (H, W, 3) that JPEG keeps close to the original."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    fx, fy, phase = rng.uniform(0.01, 0.08, 3), rng.uniform(0.01, 0.08, 3), rng.uniform(0, 6.3, 3)
    img = [127.5 + 127.5 * np.sin(fx[c] * x + fy[c] * y + phase[c]) for c in range(3)]
    return np.stack(img, -1).round().astype(np.uint8)


def make_images(root: Path, names: list[str], height: int, width: int) -> list[Path]:
    """Write one pattern image per name (format from the extension) under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pattern(i, height, width)).save(path, quality=95)
        paths.append(path)
    return paths


@pytest.fixture
def datagen() -> types.SimpleNamespace:
    """The helpers above: real_idx_images, write_idx, pattern, make_images."""
    return types.SimpleNamespace(
        real_idx_images=real_idx_images, write_idx=write_idx, pattern=pattern, make_images=make_images
    )


@pytest.fixture
def small_fmnist(tmp_path: Path) -> Path:
    """A Fashion-MNIST-shaped idx directory with 96 training and 40 test images from the real files."""
    root = tmp_path / "fmnist"
    root.mkdir()
    write_idx(root / "train-images-idx3-ubyte", real_idx_images("train-images-idx3-ubyte.gz", 96))
    write_idx(root / "t10k-images-idx3-ubyte", real_idx_images("t10k-images-idx3-ubyte.gz", 40))
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """20 images, PNG and JPEG mixed, 40x48 (H x W), in two subfolders: a 90/10 image-folder source."""
    names = [f"{'a' if i < 10 else 'b'}/img{i:03d}.{'png' if i % 2 else 'jpg'}" for i in range(20)]
    make_images(tmp_path / "folder", names, 40, 48)
    return tmp_path / "folder"


@pytest.fixture
def celeba_folder(tmp_path: Path) -> Path:
    """12 CelebA-shaped (218x178) JPEGs with a list_eval_partition.txt: 8 train, 2 valid, 2 test."""
    root = tmp_path / "celeba"
    names = [f"{i:06d}.jpg" for i in range(1, 13)]
    make_images(root, names, 218, 178)
    parts = [0] * 8 + [1] * 2 + [2] * 2
    (root / "list_eval_partition.txt").write_text(
        "".join(f"{n} {p}\n" for n, p in zip(names, parts, strict=True))
    )
    return root


@pytest.fixture(scope="session")
def prepared_fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared 8-bit Fashion-MNIST: 96 train / 40 test images cut from the real files."""
    from data.prepare import prepare

    root = tmp_path_factory.mktemp("fmnist-src")
    write_idx(root / "train-images-idx3-ubyte", real_idx_images("train-images-idx3-ubyte.gz", 96))
    write_idx(root / "t10k-images-idx3-ubyte", real_idx_images("t10k-images-idx3-ubyte.gz", 40))
    out = tmp_path_factory.mktemp("prepared") / "fmnist"
    prepare("fashion-mnist", root, out, device="cpu")
    return out


@pytest.fixture(scope="session")
def prepared_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared CIFAR-10-shaped data (random pixels, 8 per batch file): 40 train / 8 test, flips on."""
    import pickle

    from data.prepare import prepare

    base = tmp_path_factory.mktemp("cifar-src") / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (8, 3072), dtype=np.uint8)
        (base / name).write_bytes(pickle.dumps({b"data": data, b"labels": [0] * 8}, protocol=2))
    out = tmp_path_factory.mktemp("prepared") / "cifar"
    prepare("cifar10", base.parent, out, device="cpu")
    return out


@pytest.fixture(scope="session")
def prepared_5bit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared 5-bit image folder, 10 images of 8x8 (9 train / 1 test)."""
    from data.prepare import prepare

    root = tmp_path_factory.mktemp("img-src")
    make_images(root, [f"{i}.png" for i in range(10)], 12, 12)
    out = tmp_path_factory.mktemp("prepared") / "five"
    prepare("image-folder", root, out, device="cpu", size=8, bits=5)
    return out
