"""ImageNet 32 in the authors' format: Glow's TFRecords of van den Oord's downsampled ImageNet, written here in
pure Python, read by `nvae prepare` through DALI's TFRecord reader; the npz variant as the named alternative;
and the authors' random horizontal flip when training."""

from __future__ import annotations

import argparse
import gc
import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from glow_records import bytes_feature, example, glow_example, int64_feature, record

import cli.data
import cli.main
from common.errors import DataError
from data.loaders import epoch_plan, load_split, make_loader, read_manifest
from data.prepare import check_source, prepare
from data.recipes import get_recipe
from data.tfrecord import crc32c

TRAIN_SHARDS, TEST_SHARDS = (5, 4, 6), (3, 4)  # images per shard


def shard_path(root: Path, folder: str, k: int, total: int, res_log2: int = 5) -> Path:
    return root / folder / f"{folder}-r{res_log2:02d}-s-{k:04d}-of-{total:04d}.tfrecords"


def write_glow(root: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Glow-layout shards of random 32x32 images with random labels; the images per split, in shard order.

    A 64x64 (r06) shard set sits beside them, as in imagenet-oord-tfr.tar, to be ignored."""
    rng = np.random.default_rng(seed)
    written = {}
    for folder, split, counts in (("train", "train", TRAIN_SHARDS), ("validation", "test", TEST_SHARDS)):
        (root / folder).mkdir(parents=True)
        images = rng.integers(0, 256, (sum(counts), 32, 32, 3), dtype=np.uint8)
        at = 0
        for k, n in enumerate(counts):
            payloads = [glow_example(im, int(rng.integers(0, 1000))) for im in images[at : at + n]]
            shard_path(root, folder, k, len(counts)).write_bytes(b"".join(map(record, payloads)))
            at += n
        big = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
        shard_path(root, folder, 0, 1, res_log2=6).write_bytes(b"".join(record(glow_example(b)) for b in big))
        written[split] = images
    return written


def _listing(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvae")
    cli.data.register(parser.add_subparsers(dest="command"))
    return parser


def _nvae_prepare(source: Path, out: Path, *extra: str) -> int:
    args = _parser().parse_args(
        [
            "prepare",
            "--dataset",
            "imagenet32",
            "--source",
            str(source),
            "--out",
            str(out),
            "--device",
            "cpu",
            *extra,
        ]
    )
    return args.func(args)


@pytest.fixture
def glow(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "imagenet-oord-tfr"
    return root, write_glow(root)


@pytest.fixture
def own_tempdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private temporary directory for the index files, to see that they are cleaned up."""
    path = tmp_path / "tmp"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


# ------------------------------------------------------------------------------------------ reading


def test_crc32c_matches_the_standard_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value
    assert crc32c(b"") == 0
    google_crc32c = pytest.importorskip("google_crc32c")
    data = bytes(range(256)) * 3
    assert crc32c(data) == google_crc32c.value(data)


def test_nvae_prepare_reads_the_authors_tfrecords(glow, tmp_path: Path, own_tempdir: Path) -> None:
    root, written = glow
    before = _listing(root)
    assert _nvae_prepare(root, tmp_path / "out") == 0
    for split in ("train", "test"):  # Glow's validation is the split the authors report on, our 'test'
        assert np.array_equal(load_split(tmp_path / "out", split), written[split])
    manifest = read_manifest(tmp_path / "out")
    assert manifest["source"]["format"] == "tfrecord" and manifest["shape"] == [32, 32, 3]
    assert manifest["splits"]["train"]["count"] == 15 and manifest["splits"]["test"]["count"] == 7
    listed = [f["path"] for f in manifest["source"]["files"]]
    assert listed == [shard_path(Path(""), "train", k, 3).as_posix() for k in range(3)] + [
        shard_path(Path(""), "validation", k, 2).as_posix() for k in range(2)
    ]  # the r06 (64x64) shards are not read
    assert _listing(root) == before  # no index file written into the source
    gc.collect()
    assert not list(own_tempdir.iterdir())  # the index files went with the source


def test_the_extracted_tar_layout_and_an_explicit_format(tmp_path: Path) -> None:
    written = write_glow(tmp_path / "tar" / "mnt" / "host" / "imagenet-oord-tfr")
    assert _nvae_prepare(tmp_path / "tar", tmp_path / "out", "--format", "tfrecord") == 0
    assert np.array_equal(load_split(tmp_path / "out", "test"), written["test"])


def test_limit_indexes_and_reads_only_the_first_shards(glow, tmp_path: Path) -> None:
    root, written = glow
    manifest = prepare("imagenet32", root, tmp_path / "out", device="cpu", limit=7)
    assert np.array_equal(load_split(tmp_path / "out", "train"), written["train"][:7])  # 5 + 2 of shard 1
    assert np.array_equal(load_split(tmp_path / "out", "test"), written["test"][:7])
    listed = [f["path"] for f in manifest["source"]["files"]]
    assert [p for p in listed if p.startswith("train/")] == [
        shard_path(Path(""), "train", k, 3).as_posix() for k in range(2)
    ]


def test_labels_are_ignored_and_a_record_of_another_shape_is_named(glow, tmp_path: Path) -> None:
    root, _ = glow
    path = shard_path(root, "validation", 1, 2)
    image = np.zeros((32, 32, 3), np.uint8)
    good = record(glow_example(image, label=999))
    wrong = record(glow_example(image, shape=[16, 64, 3]))  # 3072 bytes, but not 32x32x3
    path.write_bytes(good + wrong + good)
    with pytest.raises(DataError) as exc:
        prepare("imagenet32", root, tmp_path / "out", device="cpu")
    assert str(exc.value) == (
        f"{path}: record at byte {len(good)}: holds 3072 bytes of shape [16, 64, 3]; expected 3072 bytes of "
        "shape [32, 32, 3] (features 'data' and 'shape')"
    )
    path.write_bytes(good + record(glow_example(np.zeros((31, 32, 3), np.uint8))))
    with pytest.raises(DataError, match=rf"{path.name}: record at byte {len(good)}: holds 2976 bytes"):
        prepare("imagenet32", root, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            "truncated",
            r"train-r05-s-0001-of-0003\.tfrecords: record 3 \(byte \d+\): truncated: its header declares",
        ),
        ("tail", r"train-r05-s-0001-of-0003\.tfrecords: 5 bytes after the last whole record"),
        (
            "length-crc",
            r"train-r05-s-0001-of-0003\.tfrecords: record 1 \(byte \d+\): length header fails its CRC",
        ),
        (
            "not-protobuf",
            r"train-r05-s-0001-of-0003\.tfrecords: record at byte \d+: not a tf\.train\.Example",
        ),
        ("no-shape", r"train-r05-s-0001-of-0003\.tfrecords: record at byte \d+: has no 'shape' feature"),
        ("no-data", r"train-r05-s-0001-of-0003\.tfrecords: record at byte \d+: has no 'data' feature"),
        ("missing-shard", r"train: 1 of 3 shards are missing: train-r05-s-0001-of-0003\.tfrecords$"),
    ],
)
def test_a_corrupt_shard_is_named(glow, tmp_path: Path, own_tempdir: Path, damage: str, message: str) -> None:
    root, _ = glow
    path = shard_path(root, "train", 1, 3)
    raw = path.read_bytes()
    size = len(raw) // TRAIN_SHARDS[1]  # all records of the shard have one size
    image = np.zeros((32, 32, 3), np.uint8)
    if damage == "truncated":
        path.write_bytes(raw[:-10])
    elif damage == "tail":
        path.write_bytes(raw + b"\x00" * 5)
    elif damage == "length-crc":
        path.write_bytes(raw[: size + 8] + bytes([raw[size + 8] ^ 0xFF]) + raw[size + 9 :])
    elif damage == "not-protobuf":
        path.write_bytes(raw[:size] + record(b"\xff\xfe not a protobuf message") + raw[size:])
    elif damage == "no-shape":
        path.write_bytes(raw[:size] + record(example({"data": bytes_feature(image.tobytes())})) + raw[size:])
    elif damage == "no-data":
        path.write_bytes(raw[:size] + record(example({"shape": int64_feature([32, 32, 3])})) + raw[size:])
    else:
        path.unlink()
    with pytest.raises(DataError, match=message):
        prepare("imagenet32", root, tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    gc.collect()
    assert not list(own_tempdir.iterdir())


def test_a_corrupt_record_fails_the_command_in_one_line(glow, tmp_path: Path, capsys) -> None:
    root, _ = glow
    path = shard_path(root, "validation", 0, 2)
    path.write_bytes(path.read_bytes()[:-1])
    argv = ["prepare", "--dataset", "imagenet32", "--source", str(root), "--out", str(tmp_path / "o")]
    assert cli.main.main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"nvae prepare: error: {path}: record 2 (byte ") and "truncated" in err[-1]


# ------------------------------------------------------------------------------- choosing the format


def _write_npz(root: Path) -> dict[str, np.ndarray]:
    """Chrabaszcz et al.'s layout: rows of 3072 bytes, channel-major (CHW)."""
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    images = {"train": rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)}
    images["test"] = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    for name, split in (("train_data_batch_1", "train"), ("val_data", "test")):
        buf = io.BytesIO()
        rows = images[split].transpose(0, 3, 1, 2).reshape(len(images[split]), -1)
        np.savez(buf, data=rows, labels=np.arange(len(rows)))
        (root / f"{name}.npz").write_bytes(buf.getvalue())
    return images


def test_the_npz_variant_stays_the_named_alternative(tmp_path: Path) -> None:
    images = _write_npz(tmp_path / "chrabaszcz")
    for fmt in ("npz", "auto"):
        assert _nvae_prepare(tmp_path / "chrabaszcz", tmp_path / fmt, "--format", fmt) == 0
        assert read_manifest(tmp_path / fmt)["source"]["format"] == "npz"
        assert np.array_equal(load_split(tmp_path / fmt, "train"), images["train"])
    assert get_recipe("imagenet32").formats == ("tfrecord", "npz")  # the authors' first


def test_format_choice_errors(glow, tmp_path: Path) -> None:
    root, _ = glow
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        DataError, match=r"empty: no ImageNet 32 found: expected Glow's TFRecords .* or Chrabaszcz"
    ):
        check_source("imagenet32", tmp_path / "empty")
    with pytest.raises(DataError, match=r"empty: no Glow ImageNet 32 TFRecords"):
        check_source("imagenet32", tmp_path / "empty", "tfrecord")
    with pytest.raises(DataError, match=r"imagenet-oord-tfr: no train_data_batch_\*\.npz files"):
        check_source("imagenet32", root, "npz")
    _write_npz(root)
    with pytest.raises(
        DataError, match="holds both TFRecords and npz batches of ImageNet 32; choose with --format"
    ):
        check_source("imagenet32", root)
    check_source("imagenet32", root, "tfrecord")
    with pytest.raises(DataError, match="format='npz': dataset 'cifar10' has one source format"):
        prepare("cifar10", root, tmp_path / "out", source_format="npz")
    with pytest.raises(SystemExit):
        _parser().parse_args(
            ["prepare", "--dataset", "imagenet32", "--source", "s", "--out", "o", "--format", "lmdb"]
        )


# --------------------------------------------------------------------------------------------- flip


def _uint8(batches: list[torch.Tensor]) -> np.ndarray:
    return (torch.cat(batches).permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def test_training_flips_as_the_authors_evaluation_never(glow, tmp_path: Path) -> None:
    root, written = glow
    prepare("imagenet32", root, tmp_path / "out", device="cpu")
    assert get_recipe("imagenet32").flip and read_manifest(tmp_path / "out")["flip"] is True

    loader = make_loader(tmp_path / "out", "train", 5, train=True, seed=3)
    plan = loader.plan
    flips = plan.flips[plan.indices]
    got = _uint8(list(loader))
    assert 0 < flips.sum() < len(flips)
    assert np.array_equal(got[flips], written["train"][plan.indices[flips]][:, :, ::-1])  # left-right mirror
    assert np.array_equal(got[~flips], written["train"][plan.indices[~flips]])
    again = _uint8(list(make_loader(tmp_path / "out", "train", 5, train=True, seed=3)))
    assert np.array_equal(got, again)  # deterministic under a seed

    coins = [make_loader(tmp_path / "out", "train", 5, train=True, seed=s).plan.flips for s in range(4)]
    assert any(not np.array_equal(coins[0], c) for c in coins[1:])  # the seed draws the coins
    many = epoch_plan(20_000, 8, train=True, seed=3, flip=True).flips
    assert abs(many.mean() - 0.5) < 0.02  # about half

    evaluation = make_loader(tmp_path / "out", "test", 7, train=False, drop_last=False)
    assert evaluation.plan.flips is None
    assert np.array_equal(_uint8(list(evaluation)), written["test"])
