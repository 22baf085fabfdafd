"""Inputs that would make `prepare` hold gigabytes, and a disk too small for the output: refused early,
with one line naming the file, and nothing written."""

import gzip
import struct
import zlib
from pathlib import Path

import pytest

from cli.main import main
from common.errors import DataError
from data.prepare import prepare
from data.sources import read_idx_file


def png_header_only(width: int, height: int) -> bytes:
    """A structurally whole PNG that claims width x height pixels (a few dozen bytes, no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_a_huge_image_is_refused_from_its_header(tmp_path, image_folder, capsys):
    bomb = image_folder / "a" / "huge.png"
    bomb.write_bytes(png_header_only(20000, 20000))
    argv = ["prepare", "--dataset", "image-folder", "--source", str(image_folder), "--size", "16"]
    assert main([*argv, "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "huge.png" in err and "20000x20000" in err and "--max-pixels" in err
    assert not (tmp_path / "out").exists()
    # The limit is an option: raised, the same image gets past the size check (and is then skipped).
    manifest = prepare(
        "image-folder", image_folder, tmp_path / "ok", size=16, device="cpu", skip_corrupt=True,
        max_pixels=400_000_001,
    )  # fmt: skip
    assert all("max-pixels" not in s["reason"] for s in manifest["skipped"])


def _gz_idx(path: Path, n: int, rows: int, cols: int, payload: int) -> Path:
    header = (0x803).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, rows, cols))
    with gzip.open(path, "wb") as f:
        f.write(header)
        for _ in range(payload >> 20):
            f.write(bytes(1 << 20))
    return path


def test_a_gzip_bomb_inflates_only_as_far_as_its_header_says(tmp_path):
    bomb = _gz_idx(tmp_path / "train-images-idx3-ubyte.gz", 1, 28, 28, 512 << 20)
    assert bomb.stat().st_size < 1 << 20  # half a GiB of zeros in well under a MB
    with pytest.raises(DataError, match="has trailing bytes"):
        read_idx_file(bomb)


def test_a_header_declaring_too_much_is_refused_before_reading(tmp_path):
    big = _gz_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 100_000, 100, 100, 0)
    with pytest.raises(DataError, match=r"954 MiB of images, over the limit of 256 MiB \(--max-file-mb\)"):
        read_idx_file(big)


def test_a_disk_too_small_is_found_before_writing(tmp_path, small_fmnist, monkeypatch, capsys):
    import shutil

    from data import prepare as prepare_mod

    real = shutil.disk_usage
    monkeypatch.setattr(prepare_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=10 << 20))
    out = tmp_path / "out"
    argv = ["prepare", "--dataset", "fashion-mnist", "--source", str(small_fmnist), "--out", str(out)]
    assert main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "GiB needed" in err and "GiB free" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["fmnist"]
