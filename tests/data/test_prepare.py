"""`prepare`: real Fashion-MNIST idx files and generated image folders through DALI in CPU mode."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data.prepare as prep
from common.errors import DataError
from data.dali_ops import ImagePipeline
from data.loaders import load_split
from data.prepare import prepare

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not list(parent.glob(f".{name}.*")), "temporary directory left behind"


def test_real_fashion_mnist_idx_files(tmp_path: Path) -> None:
    if not FASHION_MNIST.exists():
        pytest.skip("Fashion-MNIST is not available")
    manifest = prepare("fashion-mnist", FASHION_MNIST, tmp_path / "out", device="cpu", limit=500)
    with gzip.open(FASHION_MNIST / "t10k-images-idx3-ubyte.gz") as f:
        expected = np.frombuffer(f.read(16 + 500 * 784), np.uint8, offset=16).reshape(500, 28, 28, 1)
    test = load_split(tmp_path / "out", "test")
    assert isinstance(test, np.memmap) and np.array_equal(test, expected)
    assert manifest["dataset"] == "fashion-mnist"
    assert manifest["splits"]["train"]["count"] == 500 and manifest["shape"] == [28, 28, 1]
    listed = {f["path"]: f["sha256"] for f in manifest["source"]["files"]}
    real = FASHION_MNIST / "train-images-idx3-ubyte.gz"
    assert listed["train-images-idx3-ubyte.gz"] == hashlib.sha256(real.read_bytes()).hexdigest()
    assert set(manifest["tools"]) >= {"nvidia-dali", "numpy", "python", "nvae-pipeline"}


def test_manifest_checksums_match_the_written_files(tmp_path: Path, small_fmnist: Path) -> None:
    manifest = prepare("fashion-mnist", small_fmnist, tmp_path / "out", device="cpu")
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk == manifest
    for split in ("train", "test"):
        entry = manifest["splits"][split]
        data = (tmp_path / "out" / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
    assert (manifest["splits"]["train"]["count"], manifest["splits"]["test"]["count"]) == (96, 40)
    listing = (tmp_path / "out" / "sources.sha256").read_text()
    assert hashlib.sha256(listing.encode()).hexdigest() == manifest["source"]["listing_sha256"]


def test_rerun_is_byte_identical(tmp_path: Path, small_fmnist: Path, image_folder: Path) -> None:
    for dataset, source, extra in (("mnist", small_fmnist, {}), ("image-folder", image_folder, {"size": 16})):
        a, b = tmp_path / f"{dataset}-a", tmp_path / f"{dataset}-b"
        prepare(dataset, source, a, device="cpu", **extra)
        prepare(dataset, source, b, device="cpu", **extra)
        assert _files(a) == _files(b)


def test_image_folder_png_and_jpeg(tmp_path: Path, image_folder: Path, datagen) -> None:
    manifest = prepare("image-folder", image_folder, tmp_path / "out", device="cpu", size=24)
    train = load_split(tmp_path / "out", "train")
    assert train.shape == (18, 24, 24, 3) and manifest["splits"]["test"]["count"] == 2
    # img001.png, 40x48: the shorter side goes to 24 (48 -> 29 columns), then the centre 24 are kept
    ref = Image.fromarray(datagen.pattern(1, 40, 48)).resize((29, 24), Image.BILINEAR)
    ref = np.asarray(ref)[:, 3:27].astype(int)
    assert np.abs(train[1].astype(int) - ref).mean() < 2
    assert np.abs(train[2].astype(int) - ref).mean() > 20


def test_celeba64_uses_the_nvae_crop(tmp_path: Path, celeba_folder: Path) -> None:
    manifest = prepare("celeba64", celeba_folder, tmp_path / "out", device="cpu")
    assert {k: v["count"] for k, v in manifest["splits"].items()} == {"train": 8, "valid": 2, "test": 2}
    train = load_split(tmp_path / "out", "train")
    assert train.shape == (8, 64, 64, 3) and manifest["flip"] is True
    source = Image.open(celeba_folder / "000001.jpg").convert("RGB")
    ref = np.asarray(source.crop((15, 40, 163, 188)).resize((64, 64), Image.BILINEAR)).astype(int)
    assert np.abs(train[0].astype(int) - ref).mean() < 3
    shifted = np.asarray(source.crop((0, 0, 148, 148)).resize((64, 64), Image.BILINEAR)).astype(int)
    assert np.abs(train[0].astype(int) - shifted).mean() > 10


def test_five_bit_reduction(tmp_path: Path, image_folder: Path) -> None:
    prepare("image-folder", image_folder, tmp_path / "b8", device="cpu", size=16)
    manifest = prepare("image-folder", image_folder, tmp_path / "b5", device="cpu", size=16, bits=5)
    b8, b5 = load_split(tmp_path / "b8", "train"), load_split(tmp_path / "b5", "train")
    assert manifest["bits"] == 5 and manifest["max_value"] == 31 and b5.max() <= 31
    assert np.array_equal(b5, b8 // 8)


def test_ffhq_defaults_to_five_bits(tmp_path: Path, image_folder: Path) -> None:
    manifest = prepare("ffhq256", image_folder, tmp_path / "out", device="cpu", bits=None, limit=2)
    assert manifest["bits"] == 5 and manifest["shape"] == [256, 256, 3]
    assert load_split(tmp_path / "out", "train").max() <= 31


def _corrupt(folder: Path) -> Path:
    bad = folder / "a" / "img004.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    return bad


def test_corrupt_image_fails_naming_the_file(tmp_path: Path, image_folder: Path) -> None:
    bad = _corrupt(image_folder)
    with pytest.raises(DataError, match=rf"{bad}: truncated JPEG"):
        prepare("image-folder", image_folder, tmp_path / "out", device="cpu", size=16)
    _no_leftovers(tmp_path, "out")


def test_undecodable_image_with_valid_framing_fails_naming_the_file(
    tmp_path: Path, image_folder: Path
) -> None:
    bad = image_folder / "b" / "img013.png"
    data = bad.read_bytes()
    bad.write_bytes(data[:40] + bytes(range(256)) * 8 + data[-12:])  # PNG header and IEND, garbage inside
    with pytest.raises(DataError, match=rf"{bad}: cannot be decoded"):
        prepare("image-folder", image_folder, tmp_path / "out", device="cpu", size=16)
    _no_leftovers(tmp_path, "out")


def test_skip_corrupt_records_each_skipped_path(tmp_path: Path, image_folder: Path) -> None:
    _corrupt(image_folder)
    bad = image_folder / "b" / "img013.png"
    data = bad.read_bytes()
    bad.write_bytes(data[:40] + bytes(range(256)) * 8 + data[-12:])
    manifest = prepare(
        "image-folder", image_folder, tmp_path / "out", device="cpu", size=16, skip_corrupt=True
    )
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"a/img004.jpg", "b/img013.png"}
    assert skipped["a/img004.jpg"].startswith("truncated JPEG")
    assert manifest["splits"]["train"]["count"] == 16 and manifest["splits"]["test"]["count"] == 2
    assert load_split(tmp_path / "out", "train").shape == (16, 16, 16, 3)
    assert "a/img004.jpg" not in {f["path"] for f in manifest["source"]["files"]}


@pytest.mark.parametrize("problem", ["missing", "empty", "magic"])
def test_bad_sources_leave_nothing_behind(tmp_path: Path, small_fmnist: Path, datagen, problem: str) -> None:
    source, dataset = small_fmnist, "fashion-mnist"
    if problem == "missing":
        source = tmp_path / "does-not-exist"
    elif problem == "empty":
        source, dataset = tmp_path / "empty", "celebahq256"
        source.mkdir()
    else:
        datagen.write_idx(
            small_fmnist / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8), magic=0x801
        )
    with pytest.raises(DataError, match=str(source)):
        prepare(dataset, source, tmp_path / "out", device="cpu")
    _no_leftovers(tmp_path, "out")


def test_interrupted_run_leaves_nothing_that_looks_complete(
    tmp_path: Path, image_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    original = ImagePipeline.__call__

    def interrupt_on_second_batch(self, items):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, items)

    monkeypatch.setattr(ImagePipeline, "__call__", interrupt_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        prepare("image-folder", image_folder, tmp_path / "out", device="cpu", size=16)
    _no_leftovers(tmp_path, "out")


def test_existing_output_is_kept_unless_overwrite(tmp_path: Path, small_fmnist: Path) -> None:
    out = tmp_path / "out"
    prepare("fashion-mnist", small_fmnist, out, device="cpu", limit=10)
    with pytest.raises(DataError, match="output already exists"):
        prepare("fashion-mnist", small_fmnist, out, device="cpu")
    assert load_split(out, "train").shape[0] == 10
    prepare("fashion-mnist", small_fmnist, out, device="cpu", overwrite=True)
    assert load_split(out, "train").shape[0] == 96
    _no_leftovers(tmp_path, "nothing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fmnist", "out"]


def test_stale_partial_directory_of_a_killed_run_is_removed(tmp_path: Path, small_fmnist: Path) -> None:
    stale = tmp_path / ".out.partial-999999999"
    stale.mkdir()
    (stale / "train.npy").write_bytes(b"half")
    prepare("fashion-mnist", small_fmnist, tmp_path / "out", device="cpu")
    assert not stale.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 6}, "bits=6 is not supported"),
        ({"size": 32}, "stored at 28x28; size=32 is not allowed"),
        ({"limit": 0}, "limit=0 must be a positive"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
    ],
)
def test_invalid_arguments(tmp_path: Path, small_fmnist: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        prepare("fashion-mnist", small_fmnist, tmp_path / "out", **kwargs)
    with pytest.raises(DataError, match="unknown dataset 'svhn'"):
        prepare("svhn", small_fmnist, tmp_path / "out")
    with pytest.raises(DataError, match="needs a size"):
        prepare("image-folder", small_fmnist, tmp_path / "out")


def test_gpu_request_without_gpu_is_refused(tmp_path: Path, small_fmnist: Path, monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DataError, match="no CUDA device"):
        prepare("fashion-mnist", small_fmnist, tmp_path / "out", device="gpu")
    manifest = prepare("fashion-mnist", small_fmnist, tmp_path / "out", device="auto", limit=4)
    assert manifest["device"] == "cpu"


def test_cifar10_end_to_end(tmp_path: Path) -> None:
    import pickle

    base = tmp_path / "src" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = {}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        rows[name] = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        (base / name).write_bytes(pickle.dumps({b"data": rows[name], b"labels": [0, 1, 2]}, protocol=2))
    manifest = prepare("cifar10", tmp_path / "src", tmp_path / "out", device="cpu")
    test = load_split(tmp_path / "out", "test")
    assert manifest["splits"]["train"]["count"] == 15 and test.shape == (3, 32, 32, 3)
    assert np.array_equal(test, rows["test_batch"].reshape(3, 3, 32, 32).transpose(0, 2, 3, 1))
    assert manifest["flip"] is True


def test_progress_and_summary_are_reported(tmp_path: Path, small_fmnist: Path, caplog) -> None:
    caplog.set_level("INFO", logger="data.prepare")
    caplog.set_level("INFO", logger="nvae.progress")  # no terminal here: progress comes as log lines
    prepare("fashion-mnist", small_fmnist, tmp_path / "out", device="cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "nvae.progress"]
    assert (
        lines and lines[-1].startswith("prepare fashion-mnist: 136/136 img (100%)") and "img/s" in lines[-1]
    )
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prepared fashion-mnist")]
    assert summary and "136 images (train 96, test 40)" in summary[0] and "images/s" in summary[0]


def test_split_writer_shrinks_after_skips(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.arange(10, dtype=np.uint8).reshape(5, 2))
    prep._shrink(path, 3)
    assert np.array_equal(np.load(path), np.arange(6, dtype=np.uint8).reshape(3, 2))


def test_a_split_with_every_image_skipped_is_an_error(tmp_path: Path, datagen) -> None:
    paths = datagen.make_images(tmp_path / "src", ["a.png", "b.jpg"], 8, 8)
    for p in paths:
        p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(DataError, match="no usable image in split 'train' \\(all 1 skipped\\)"):
        prepare("image-folder", tmp_path / "src", tmp_path / "out", device="cpu", size=8, skip_corrupt=True)
    _no_leftovers(tmp_path, "out")
