"""Raw-format readers: idx, CIFAR pickles (restricted unpickler), ImageNet 32 npz, image folders, symlinks."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from common.errors import DataError
from data.recipes import get_recipe
from data.sources import (
    check_encoded,
    parse_cifar_batch,
    read_cifar10_source,
    read_idx_file,
    read_idx_source,
    read_image_source,
    read_imagenet32_source,
)


def test_idx_roundtrip_plain_and_gz(tmp_path: Path, datagen) -> None:
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    for compress in (False, True):
        path = datagen.write_idx(tmp_path / f"x{compress}", images, compress=compress)
        assert np.array_equal(read_idx_file(path)[..., 0], images)


def test_wrong_idx_magic_names_file_and_magic(tmp_path: Path, datagen) -> None:
    path = datagen.write_idx(tmp_path / "labels", np.zeros((2, 3, 3), np.uint8), magic=0x00000801)
    with pytest.raises(DataError, match=r"labels\.gz: wrong idx magic number 0x00000801"):
        read_idx_file(path)


def test_truncated_idx_names_file(tmp_path: Path, datagen) -> None:
    path = datagen.write_idx(tmp_path / "imgs", np.zeros((4, 5, 5), np.uint8), compress=False)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match=r"imgs: truncated: header declares 4 images of 5x5"):
        read_idx_file(path)


def test_corrupt_gzip_names_file(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: cannot read idx file"):
        read_idx_file(path)


def test_idx_source_needs_both_files(small_fmnist: Path) -> None:
    (small_fmnist / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="no test-image idx file"):
        read_idx_source(small_fmnist, None)


def _cifar_batch(n: int, seed: int = 0, row: int = 3072) -> dict:
    data = np.random.default_rng(seed).integers(0, 256, (n, row), dtype=np.uint8)
    return {b"batch_label": b"x", b"labels": [0] * n, b"data": data, b"filenames": [b"f"] * n}


def _write_cifar_dir(root: Path, n: int = 4) -> Path:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        (base / name).write_bytes(pickle.dumps(_cifar_batch(n, i), protocol=2))
    return root


def test_cifar_batch_layout_is_hwc() -> None:
    batch = _cifar_batch(2)
    images = parse_cifar_batch(pickle.dumps(batch, protocol=2), "b")
    assert images.shape == (2, 32, 32, 3)
    # CIFAR rows are the R plane, then G, then B, each row-major
    assert images[1, 0, 1, 0] == batch[b"data"][1, 1]
    assert images[1, 0, 0, 2] == batch[b"data"][1, 2048]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_cifar_unpickler_refuses_arbitrary_globals(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps({b"data": _Evil()}, protocol=2)
    with pytest.raises(DataError, match=r"b: not a CIFAR-10 python batch: UnpicklingError: forbidden global"):
        parse_cifar_batch(payload, "b")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([1, 2], "expected a dict"),
        ({b"labels": []}, "no numpy array under 'data'"),
        (_cifar_batch(2, row=1024), r"'data' has shape \(2, 1024\)"),
        ({b"data": np.zeros((2, 3072), np.float32)}, "dtype float32"),
    ],
)
def test_cifar_wrong_structure_is_rejected(obj: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_cifar_batch(pickle.dumps(obj, protocol=2), "data_batch_1")


def test_cifar_directory_and_tarball_agree(tmp_path: Path) -> None:
    root = _write_cifar_dir(tmp_path / "dir")
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    a, b = read_cifar10_source(root, None), read_cifar10_source(tar_path, 7)
    assert [c.count for c in a.splits["train"]] == [20] and b.splits["train"][0].count == 7
    assert np.array_equal(a.splits["train"][0].load()[:7], b.splits["train"][0].load())
    assert np.array_equal(a.splits["test"][0].load()[:4], b.splits["test"][0].load()[:4])


def test_cifar_tarball_with_symlink_member_is_refused(tmp_path: Path) -> None:
    tar_path = tmp_path / "c.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DataError, match="data_batch_1 is not a regular file"):
        read_cifar10_source(tar_path, None)


def test_missing_cifar_batches_are_named(tmp_path: Path) -> None:
    root = _write_cifar_dir(tmp_path)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing CIFAR-10 batches: data_batch_3"):
        read_cifar10_source(root, None)


def test_imagenet32_npz_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, n in (("train_data_batch_1", 5), ("train_data_batch_2", 3), ("val_data", 4)):
        buf = io.BytesIO()
        np.savez(buf, data=rng.integers(0, 256, (n, 3072), dtype=np.uint8), labels=np.arange(n))
        (tmp_path / f"{name}.npz").write_bytes(buf.getvalue())
    src = read_imagenet32_source(tmp_path, 6)
    assert [c.count for c in src.splits["train"]] == [5, 1] and src.splits["test"][0].count == 4
    images = src.splits["train"][1].load()
    assert images.shape == (1, 32, 32, 3)
    np.savez(tmp_path / "val_data.npz", data=np.zeros((2, 100), np.uint8))
    with pytest.raises(DataError, match=r"val_data.npz: 'data' has shape \(2, 100\)"):
        read_imagenet32_source(tmp_path, None)


def test_symlink_escaping_the_source_is_rejected(tmp_path: Path, image_folder: Path, datagen) -> None:
    outside = datagen.make_images(tmp_path / "outside", ["secret.png"], 8, 8)[0]
    (image_folder / "a" / "link.png").symlink_to(outside)
    with pytest.raises(DataError, match="link.png: symlink points outside the source directory"):
        read_image_source(image_folder, get_recipe("image-folder"), None)


def test_symlinked_directory_escaping_the_source_is_rejected(
    tmp_path: Path, image_folder: Path, datagen
) -> None:
    datagen.make_images(tmp_path / "outside", ["secret.png"], 8, 8)
    (image_folder / "sub").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(DataError, match="sub: symlink points outside"):
        read_image_source(image_folder, get_recipe("image-folder"), None)


def test_symlink_inside_the_source_is_allowed_and_hidden_files_ignored(image_folder: Path) -> None:
    (image_folder / "again.png").symlink_to(image_folder / "a" / "img001.png")
    (image_folder / "._again.png").write_bytes(b"\x00\x05\x16\x07")  # macOS resource fork
    (image_folder / ".cache").mkdir()
    (image_folder / ".cache" / "x.png").write_bytes(b"")
    src = read_image_source(image_folder, get_recipe("image-folder"), None)
    assert sum(len(v) for v in src.splits.values()) == 21


def test_image_folder_split_rules(tmp_path: Path, image_folder: Path, datagen) -> None:
    src = read_image_source(image_folder, get_recipe("ffhq256"), None)
    assert (len(src.splits["train"]), len(src.splits["test"])) == (18, 2)  # 90 / 10, sorted order
    assert src.splits["test"][-1].name == "img019.png"
    datagen.make_images(tmp_path / "tt" / "train", ["x.png", "y.png"], 8, 8)
    datagen.make_images(tmp_path / "tt" / "test", ["z.jpg"], 8, 8)
    src = read_image_source(tmp_path / "tt", get_recipe("image-folder"), None)
    assert [p.name for p in src.splits["test"]] == ["z.jpg"]
    src = read_image_source(tmp_path / "tt" / "train", get_recipe("image-folder"), None)
    assert [len(v) for v in src.splits.values()] == [1, 1]  # a test split is never left empty
    (tmp_path / "tt" / "train" / "y.png").unlink()
    with pytest.raises(DataError, match="needs at least 2 images, found 1"):
        read_image_source(tmp_path / "tt" / "train", get_recipe("image-folder"), None)


def test_celeba_partitions_from_file_and_from_numbers(tmp_path: Path, celeba_folder: Path, datagen) -> None:
    src = read_image_source(celeba_folder, get_recipe("celeba64"), None)
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 8, "valid": 2, "test": 2}
    root = tmp_path / "numbered"
    datagen.make_images(root, ["162770.jpg", "162771.jpg", "202599.jpg"], 8, 8)
    src = read_image_source(root, get_recipe("celeba64"), None)
    assert {k: [p.stem for p in v] for k, v in src.splits.items()} == {
        "train": ["162770"],
        "valid": ["162771"],
        "test": ["202599"],
    }


def test_empty_folder_and_missing_path(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no PNG/JPEG images found"):
        read_image_source(tmp_path / "empty", get_recipe("ffhq256"), None)
    with pytest.raises(DataError, match="nowhere: source path does not exist"):
        read_image_source(tmp_path / "nowhere", get_recipe("ffhq256"), None)


def test_check_encoded_spots_truncation_and_junk(image_folder: Path) -> None:
    png = (image_folder / "a" / "img001.png").read_bytes()
    jpg = (image_folder / "a" / "img000.jpg").read_bytes()
    assert check_encoded(png) is None and check_encoded(jpg) is None
    assert check_encoded(png[: len(png) // 2]) == "truncated PNG (no IEND chunk)"
    assert check_encoded(jpg[: len(jpg) // 2]) == "truncated JPEG (no end-of-image marker)"
    assert check_encoded(b"") == "empty file"
    assert "unrecognised header" in check_encoded(b"GIF89a....")


def test_celeba64_is_evaluated_on_validation_like_the_authors_and_the_rest_on_test():
    from data.recipes import RECIPES, default_eval_split

    assert default_eval_split("celeba64") == "valid"
    assert {name: default_eval_split(name) for name in RECIPES if name != "celeba64"} == {
        name: "test" for name in RECIPES if name != "celeba64"
    }
    assert default_eval_split("not-a-recipe") == "test"
