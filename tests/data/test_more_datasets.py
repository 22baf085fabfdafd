"""The authors' datasets beyond the paper's tables, each from a small file in its raw format: stacked MNIST (from
MNIST's idx files), OMNIGLOT (Burda et al.'s chardata.mat), LSUN (its LMDBs of WebP images) and ImageNet 64
(Glow's r06 TFRecords, or the 64x64 npz batches); each prepares and trains for a few steps."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from glow_records import glow_record
from tiny import TINY_SET

from cli.main import main
from common.errors import DataError
from data.loaders import epoch_plan, gather, load_split, read_manifest
from data.more_sources import STACKED_MNIST_SEED, stacked_mnist_indices
from data.prepare import check_source, prepare

# ----------------------------------------------------------------------------------------- raw formats


def write_mnist(
    root: Path, datagen, n_train: int = 40, n_test: int = 12, seed: int = 0
) -> dict[str, np.ndarray]:
    """MNIST-shaped idx files of random digits: the training file gzip-compressed, the test file plain."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    digits = {}
    for split, name, n in (
        ("train", "train-images-idx3-ubyte", n_train),
        ("test", "t10k-images-idx3-ubyte", n_test),
    ):
        digits[split] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        datagen.write_idx(root / name, digits[split], compress=split == "train")
    return digits


def write_chardata(path: Path, n_train: int = 30, n_test: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    values = {"data": rng.random((784, n_train)), "testdata": rng.random((784, n_test))}
    values["data"][:, 0] = 1.0  # the top of the range stays 255
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {**values, "target": np.zeros((50, n_train)), "testtarget": np.zeros((50, n_test))})
    return values


def webp(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="WEBP", quality=90)
    return buf.getvalue()


LSUN_SIZES = [(96, 72), (72, 100), (64, 64), (130, 80), (66, 90)]  # (W, H): landscape, portrait, square


def write_lsun(root: Path, category: str, seed: int = 0, n_val: int = 3) -> dict[str, list[bytes]]:
    import lmdb

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    records = {}
    for theirs, sizes in (("train", LSUN_SIZES), ("val", LSUN_SIZES[:n_val])):
        env = lmdb.open(str(root / f"{category}_{theirs}_lmdb"), map_size=1 << 26)
        blobs = []
        with env.begin(write=True) as txn:
            for k, (w, h) in enumerate(sizes):
                blob = webp(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
                txn.put(f"{k:040x}".encode(), blob)  # LSUN's keys are 40-hex-digit hashes
                blobs.append(blob)
        env.close()
        records[theirs] = blobs
    return records


def _train_steps(data: Path, out: Path, preset: str, *extra: str) -> None:
    argv = ["train", "--no-progress", "--data", str(data), "--out", str(out), "--preset", preset]
    argv += ["--steps", "2", "--batch-size", "2", "--precision", "fp32"]
    argv += [a for item in (*TINY_SET, *extra) for a in ("--set", item)]
    assert main(argv) == 0
    assert (out / "checkpoint.pt").is_file()


# --------------------------------------------------------------------------------------- stacked MNIST


def test_stacked_mnist_follows_the_authors_rule_under_a_seed(tmp_path: Path, datagen) -> None:
    digits = write_mnist(tmp_path / "mnist", datagen)
    manifest = prepare("stacked-mnist", tmp_path / "mnist", tmp_path / "out", device="cpu")
    assert manifest["shape"] == [28, 28, 3] and not manifest["binarize"] and not manifest["flip"]
    assert manifest["source"]["stacked_mnist_seed"] == STACKED_MNIST_SEED
    for split, n in (("train", 40), ("test", 12)):
        images = load_split(tmp_path / "out", split)
        assert images.shape == (2 * n, 28, 28, 3)  # two permutations per channel: twice MNIST's count
        index = stacked_mnist_indices(n, STACKED_MNIST_SEED, split)
        for c in range(3):
            # each channel's index is two permutations of the split laid end to end
            assert sorted(index[:n, c]) == list(range(n)) and sorted(index[n:, c]) == list(range(n))
            for k in (0, n - 1, n, 2 * n - 1):
                assert np.array_equal(images[k, :, :, c], digits[split][index[k, c]])
    # reproducible, and a limit keeps the first images of the full preparation
    prepare("stacked-mnist", tmp_path / "mnist", tmp_path / "again", device="cpu", limit=7)
    assert np.array_equal(load_split(tmp_path / "again", "train"), load_split(tmp_path / "out", "train")[:7])
    assert not np.array_equal(stacked_mnist_indices(40, 1, "train"), stacked_mnist_indices(40, 2, "train"))


def test_stacked_mnist_trains(tmp_path: Path, datagen) -> None:
    write_mnist(tmp_path / "mnist", datagen)
    prepare("stacked-mnist", tmp_path / "mnist", tmp_path / "out", device="cpu", limit=8)
    _train_steps(tmp_path / "out", tmp_path / "run", "stacked-mnist")


# -------------------------------------------------------------------------------------------- OMNIGLOT


def test_omniglot_reads_chardata_as_the_authors(tmp_path: Path) -> None:
    values = write_chardata(tmp_path / "omniglot" / "chardata.mat")
    manifest = prepare("omniglot", tmp_path / "omniglot", tmp_path / "out", device="cpu")
    assert manifest["shape"] == [28, 28, 1] and manifest["binarize"]
    for split, key in (("train", "data"), ("test", "testdata")):
        images = load_split(tmp_path / "out", split)[..., 0]
        v = values[key].astype(np.float32)
        n = v.shape[1]
        assert images.shape == (n, 28, 28)
        for i in (0, n - 1):
            for r, c in ((0, 1), (5, 20), (27, 3)):
                # column-major pixels: row r, column c of image i is entry c * 28 + r
                assert images[i, r, c] == np.uint8(np.float32(255) * v[c * 28 + r, i])
    assert load_split(tmp_path / "out", "train")[0].max() == 255
    # the file itself is a source too
    prepare("omniglot", tmp_path / "omniglot" / "chardata.mat", tmp_path / "file", device="cpu", limit=4)
    assert np.array_equal(load_split(tmp_path / "file", "test"), load_split(tmp_path / "out", "test")[:4])


def test_a_bad_chardata_is_named(tmp_path: Path) -> None:
    from scipy.io import savemat

    with pytest.raises(DataError, match="no chardata.mat"):
        check_source("omniglot", tmp_path)
    savemat(str(tmp_path / "chardata.mat"), {"data": np.full((784, 3), 2.0), "testdata": np.zeros((784, 2))})
    with pytest.raises(DataError, match=r"chardata.mat:data: values outside \[0, 1\]"):
        check_source("omniglot", tmp_path)
    savemat(str(tmp_path / "chardata.mat"), {"data": np.zeros((780, 3)), "testdata": np.zeros((784, 2))})
    with pytest.raises(DataError, match=r"has shape \(780, 3\); expected \(784, N\)"):
        check_source("omniglot", tmp_path)
    savemat(str(tmp_path / "chardata.mat"), {"data": np.zeros((784, 3))})
    with pytest.raises(DataError, match="no 'testdata' array"):
        check_source("omniglot", tmp_path)
    (tmp_path / "chardata.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(DataError, match="not a readable MATLAB file"):
        check_source("omniglot", tmp_path)


def test_omniglot_trains(tmp_path: Path) -> None:
    write_chardata(tmp_path / "omniglot" / "chardata.mat", n_train=8, n_test=4)
    prepare("omniglot", tmp_path / "omniglot", tmp_path / "out", device="cpu")
    _train_steps(tmp_path / "out", tmp_path / "run", "omniglot")


# ------------------------------------------------------------------------------------------------ LSUN


def test_lsun_is_resized_and_cropped_as_torchvision_does(tmp_path: Path) -> None:
    """Test images: Resize + CenterCrop. Training images: Resize, stored whole; read as an array they show the
    centre square, and a training epoch takes RandomCrop's window at the plan's offset."""
    from PIL import Image

    transforms = pytest.importorskip("torchvision.transforms")
    records = write_lsun(tmp_path / "lsun", "church_outdoor")
    manifest = prepare("lsun-church", tmp_path / "lsun", tmp_path / "out", size=64, device="cpu")
    assert manifest["shape"] == [64, 64, 3] and manifest["flip"]
    assert manifest["source"]["lsun_category"] == "church_outdoor"
    assert (
        manifest["splits"]["train"]["index"] == "train_index.npy"
        and "index" not in manifest["splits"]["test"]
    )
    resize, centre = transforms.Resize(64), transforms.CenterCrop(64)  # the authors' transforms
    for split, key in (("train", "train"), ("test", "val")):
        images = load_split(tmp_path / "out", split)
        assert len(images) == len(records[key]) and images.shape[1:] == (64, 64, 3)
        for i, blob in enumerate(records[key]):  # in the LMDB's key order
            resized = resize(Image.open(io.BytesIO(blob)).convert("RGB"))
            assert np.array_equal(images[i], np.asarray(centre(resized)))
            if split == "train":
                assert np.array_equal(images.whole(i), np.asarray(resized))
    train = load_split(tmp_path / "out", "train")
    plan = epoch_plan(len(train), 5, train=True, seed=3, epoch=1, crop=True)
    batch, _, _ = gather(train, plan, 0)
    for b, i in enumerate(plan.batch_indices(0)):
        whole = train.whole(int(i))
        h, w = whole.shape[:2]
        top = int(plan.crops[i] * (h - 64 + 1)) if h > 64 else 0
        left = int(plan.crops[i] * (w - 64 + 1)) if w > 64 else 0
        assert np.array_equal(batch[b], whole[top : top + 64, left : left + 64])


def test_random_crops_cover_every_offset_and_both_loaders_agree(tmp_path: Path) -> None:
    """Over epochs, each image's window takes every offset along its longer side, uniformly, as RandomCrop's
    randint; the DALI loader gives the torch loader's batches; evaluation batches are the centre squares."""
    from data.loaders import make_loader
    from data.strips import random_offset

    write_lsun(tmp_path / "lsun", "tower")
    prepare("lsun-tower", tmp_path / "lsun", tmp_path / "out", size=64, device="cpu")
    counts = np.bincount([random_offset(97, 64, u) for u in np.random.default_rng(0).random(34_000)])
    assert len(counts) == 34 and abs(counts / 1000 - 1).max() < 0.2  # 0..33, each about 1/34
    train = load_split(tmp_path / "out", "train")
    wide = next(i for i in range(len(train)) if train.whole(i).shape[1] > 64)  # a landscape image
    seen = set()
    for epoch in range(40):
        batches = list(make_loader(tmp_path / "out", "train", 5, train=True, epoch=epoch, flip=False))
        (x,) = batches
        order = epoch_plan(len(train), 5, train=True, epoch=epoch).indices
        row = x[int(np.flatnonzero(order == wide)[0])].permute(1, 2, 0).numpy()
        whole = train.whole(wide).astype(np.float32) / 255
        seen |= {o for o in range(whole.shape[1] - 63) if np.array_equal(row, whole[:, o : o + 64])}
        if epoch < 3:
            dali = list(make_loader(tmp_path / "out", "train", 5, train=True, epoch=epoch, backend="dali"))
            torch_ = list(make_loader(tmp_path / "out", "train", 5, train=True, epoch=epoch))
            assert all(torch.equal(a, b) for a, b in zip(torch_, dali, strict=True))
    assert len(seen) >= 10  # of its 85 - 64 + 1 = 22 offsets (96x72, resized to 85x64), most reached
    (x,) = list(make_loader(tmp_path / "out", "train", 5, train=False))
    assert torch.equal(x[0].permute(1, 2, 0), torch.from_numpy(train[0].astype(np.float32) / 255))


def test_a_whole_split_is_reduced_to_fewer_bits_by_dali(tmp_path: Path) -> None:
    write_lsun(tmp_path / "lsun", "bedroom")
    prepare("lsun-bedroom", tmp_path / "lsun", tmp_path / "b8", size=64, device="cpu")
    prepare("lsun-bedroom", tmp_path / "lsun", tmp_path / "b5", size=64, bits=5, device="cpu")
    b8, b5 = load_split(tmp_path / "b8", "train"), load_split(tmp_path / "b5", "train")
    assert np.array_equal(b5.index, b8.index)
    assert np.array_equal(np.asarray(b5.data), np.asarray(b8.data) // 8)


def test_a_changed_or_inconsistent_index_is_refused(tmp_path: Path) -> None:
    write_lsun(tmp_path / "lsun", "bedroom")
    prepare("lsun-bedroom", tmp_path / "lsun", tmp_path / "out", size=64, device="cpu")
    index_path = tmp_path / "out" / "train_index.npy"
    index = np.load(index_path)
    index[1, 1] += 1  # image 1 one row taller than its bytes
    np.save(index_path, index)
    with pytest.raises(DataError, match=r"train_index.npy: sha256 .* differs from the manifest's"):
        load_split(tmp_path / "out", "train", verify=True)
    with pytest.raises(DataError, match=r"train_index.npy: offsets do not lay the images end to end"):
        load_split(tmp_path / "out", "train", verify=False)


def test_lsun_sizes_folders_and_records_are_checked(tmp_path: Path) -> None:
    import lmdb

    write_lsun(tmp_path / "lsun", "tower")
    with pytest.raises(DataError, match="size=32 is not a size of 'lsun-tower'; choose one of: 64, 128, 256"):
        prepare("lsun-tower", tmp_path / "lsun", tmp_path / "out", size=32, device="cpu")
    with pytest.raises(DataError, match="needs a size"):
        prepare("lsun-tower", tmp_path / "lsun", tmp_path / "out", device="cpu")
    with pytest.raises(DataError, match=r"bedroom_train_lmdb: missing \(LSUN's bedroom_train_lmdb.zip"):
        check_source("lsun-bedroom", tmp_path / "lsun")
    env = lmdb.open(str(tmp_path / "lsun" / "tower_val_lmdb"), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(b"f" * 40, b"RIFF\x00\x00\x00\x00WEBPVP8 broken")
    env.close()
    with pytest.raises(DataError, match=r"tower_val_lmdb\[f{40}\]: not a decodable image"):
        prepare("lsun-tower", tmp_path / "lsun", tmp_path / "out", size=64, device="cpu")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_lsun_trains(tmp_path: Path) -> None:
    write_lsun(tmp_path / "lsun", "bedroom")
    prepare("lsun-bedroom", tmp_path / "lsun", tmp_path / "out", size=64, device="cpu")
    _train_steps(tmp_path / "out", tmp_path / "run", "lsun-bedroom", "num_scales=2", "groups=1", "num_nf=0")


# ------------------------------------------------------------------------------------------ ImageNet 64


def write_glow64(root: Path, counts=((3, 2), (2,)), seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    written = {}
    for folder, split, shards in (("train", "train", counts[0]), ("validation", "test", counts[1])):
        (root / folder).mkdir(parents=True)
        images = rng.integers(0, 256, (sum(shards), 64, 64, 3), dtype=np.uint8)
        at = 0
        for k, n in enumerate(shards):
            name = f"{folder}-r06-s-{k:04d}-of-{len(shards):04d}.tfrecords"
            (root / folder / name).write_bytes(b"".join(glow_record(im) for im in images[at : at + n]))
            at += n
        written[split] = images
    return written


def test_imagenet64_reads_the_r06_tfrecords_and_the_npz_batches(tmp_path: Path) -> None:
    written = write_glow64(tmp_path / "tfr")
    manifest = prepare("imagenet64", tmp_path / "tfr", tmp_path / "out", device="cpu")
    assert manifest["shape"] == [64, 64, 3] and manifest["source"]["format"] == "tfrecord"
    for split in ("train", "test"):
        assert np.array_equal(load_split(tmp_path / "out", split), written[split])
    npz = tmp_path / "npz"
    npz.mkdir()
    rows = {
        s: a.transpose(0, 3, 1, 2).reshape(len(a), -1) for s, a in written.items()
    }  # Chrabaszcz: CHW rows
    np.savez(npz / "train_data_batch_1.npz", data=rows["train"], labels=np.zeros(5))
    np.savez(npz / "val_data.npz", data=rows["test"], labels=np.zeros(2))
    manifest = prepare("imagenet64", npz, tmp_path / "out-npz", device="cpu")
    assert manifest["source"]["format"] == "npz"
    assert np.array_equal(load_split(tmp_path / "out-npz", "train"), written["train"])
    with pytest.raises(
        DataError, match=r"no ImageNet 64 found: expected Glow's TFRecords \(train/train-r06-s-"
    ):
        check_source("imagenet64", tmp_path / "out")


def test_imagenet64_trains(tmp_path: Path) -> None:
    write_glow64(tmp_path / "tfr")
    prepare("imagenet64", tmp_path / "tfr", tmp_path / "out", device="cpu")
    _train_steps(tmp_path / "out", tmp_path / "run", "imagenet64", "num_scales=2", "groups=1", "num_nf=0")


def test_the_manifests_datasets_are_the_presets_datasets(tmp_path: Path) -> None:
    """Every new recipe has a preset of the same dataset, so that `--preset NAME` trains on `--dataset NAME`."""
    from model.config import get_preset

    for name in ("stacked-mnist", "omniglot", "imagenet64", "lsun-bedroom", "lsun-church", "lsun-tower"):
        assert get_preset(name).dataset == name
    write_chardata(tmp_path / "o" / "chardata.mat", n_train=2, n_test=2)
    prepare("omniglot", tmp_path / "o", tmp_path / "out", device="cpu")
    assert read_manifest(tmp_path / "out")["dataset"] == "omniglot"


@pytest.mark.gpu
def test_lsun_on_the_gpu_prepares_and_loads_as_on_the_cpu(tmp_path: Path) -> None:
    """DALI's ragged bit reduction and loader on the GPU: the same files and the same training batches."""
    from data.loaders import make_loader

    write_lsun(tmp_path / "lsun", "bedroom")
    for device in ("cpu", "gpu"):
        prepare("lsun-bedroom", tmp_path / "lsun", tmp_path / device, size=64, bits=5, device=device)
    for name in ("train.npy", "train_index.npy", "test.npy"):
        assert (tmp_path / "cpu" / name).read_bytes() == (tmp_path / "gpu" / name).read_bytes(), name
    kw = {"train": True, "seed": 1, "epoch": 2}
    cpu = list(make_loader(tmp_path / "cpu", "train", 5, **kw))
    gpu = list(make_loader(tmp_path / "gpu", "train", 5, device="cuda", **kw))
    assert gpu[0].is_cuda and all(torch.equal(x, y.cpu()) for x, y in zip(cpu, gpu, strict=True))
