"""TFRecord files without TensorFlow: find Glow's ImageNet 32 shards, index them with DALI's `tfrecord2idx`,
and check the record framing the index tool takes on trust.

A TFRecord file is a sequence of records: uint64 length (little-endian), uint32 masked CRC-32C of those 8
bytes, `length` bytes of payload (a serialized `tf.train.Example`), uint32 masked CRC-32C of the payload.
DALI's reader needs one index file per TFRecord file ("<offset> <size>" per record), made by the script it
ships. That script accepts a truncated file without complaint, so every index is checked against the file:
the records must tile it exactly, each length header must pass its CRC, and each record's size must match its
header. Payload CRCs are not checked (nor are they by the authors' converter); a damaged payload fails as a
protobuf parse error or as image data of the wrong size when the records are read.
"""

from __future__ import annotations

import logging
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.errors import DataError

log = logging.getLogger(__name__)

INDEX_TOOL = "tfrecord2idx"  # installed next to the Python of the nvidia-dali wheel
HEADER_BYTES = 12  # uint64 length + uint32 masked CRC of the length
FOOTER_BYTES = 4  # uint32 masked CRC of the payload

# Glow's downsampled ImageNet ("imagenet-oord-tfr.tar"): <split>/<split>-r<log2 side>-s-<k>-of-<n>.tfrecords,
# 2000 train and 80 validation shards, extracted under mnt/host/imagenet-oord-tfr/.
GLOW_SPLITS = {"train": "train", "validation": "test"}  # Glow's directory -> our split name
GLOW_TAR_ROOT = Path("mnt/host/imagenet-oord-tfr")


# ------------------------------------------------------------------------------------------- CRC-32C


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli polynomial, reflected
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`; table-driven pure Python, meant for short inputs like length headers."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """The CRC as TFRecord stores it: rotated right by 15 bits plus a constant (TensorFlow's `crc32c::Mask`)."""
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ----------------------------------------------------------------------------------------- discovery


def has_glow_shards(root: Path, side: int) -> bool:
    """Whether `root` (or its extracted-tar path) holds any Glow training shard of resolution `side`."""
    return any(_split_files(base / "train", "train", side) for base in (root, root / GLOW_TAR_ROOT))


def glow_shards(root: Path, side: int) -> dict[str, list[Path]]:
    """Glow's shards of resolution `side` under `root` (or its extracted-tar path), per our split name, in
    shard order. DataError when there are none, or a split is missing or incomplete."""
    base = next((b for b in (root, root / GLOW_TAR_ROOT) if _split_files(b / "train", "train", side)), None)
    if base is None:
        res = f"r{_log2(side):02d}"
        raise DataError(
            f"{root}: no Glow ImageNet {side} TFRecords (train/train-{res}-s-*-of-*.tfrecords and "
            f"validation/validation-{res}-s-*-of-*.tfrecords, from imagenet-oord-tfr.tar)"
        )
    shards = {}
    for folder, split in GLOW_SPLITS.items():
        found = _split_files(base / folder, folder, side)
        if not found:
            raise DataError(f"{base / folder}: no {folder}-r{_log2(side):02d}-s-*-of-*.tfrecords files")
        totals = {n for _, n, _ in found}
        if len(totals) != 1:
            raise DataError(
                f"{base / folder}: shards disagree on their total ({', '.join(map(str, sorted(totals)))})"
            )
        total = totals.pop()
        have = {k for k, _, _ in found}
        missing = [k for k in range(total) if k not in have]
        if missing:
            names = ", ".join(_shard_name(folder, side, k, total) for k in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise DataError(f"{base / folder}: {len(missing)} of {total} shards are missing: {names}{more}")
        shards[split] = [p for _, _, p in sorted(found)]
    return shards


def _log2(side: int) -> int:
    """Glow names a resolution by its log2: r05 is 32x32."""
    return side.bit_length() - 1


def _shard_name(folder: str, side: int, k: int, total: int) -> str:
    return f"{folder}-r{_log2(side):02d}-s-{k:04d}-of-{total:04d}.tfrecords"


def _split_files(folder: Path, name: str, side: int) -> list[tuple[int, int, Path]]:
    """(shard, total, path) of the shards of one split folder; empty when the folder is absent."""
    if not folder.is_dir():
        return []
    pattern = re.compile(rf"{re.escape(name)}-r{_log2(side):02d}-s-(\d+)-of-(\d+)\.tfrecords")
    found = []
    for p in folder.iterdir():
        m = pattern.fullmatch(p.name)
        if m:
            found.append((int(m[1]), int(m[2]), p))
    return found


# ---------------------------------------------------------------------------------------------- index


def index_tool() -> list[str]:
    """The command that runs DALI's `tfrecord2idx` (the script next to this Python, else on PATH)."""
    beside = Path(sys.executable).parent / INDEX_TOOL
    script = beside if beside.is_file() else shutil.which(INDEX_TOOL)
    if script is None:
        raise DataError(
            f"{INDEX_TOOL} not found (it ships with nvidia-dali: pip install nvidia-dali-cuda130)"
        )
    return [sys.executable, str(script)]


def make_index(record_file: Path, index_file: Path) -> int:
    """Index `record_file` into `index_file` with DALI's tool, check it against the file; returns the count.

    DataError naming the file when it is not whole TFRecords (the tool itself exits 0 on a bad file).
    """
    index_file.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([*index_tool(), str(record_file), str(index_file)], capture_output=True, text=True)
    if done.returncode != 0 or not index_file.is_file():
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no index written"]
        raise DataError(f"{record_file}: {INDEX_TOOL} failed: {detail[0]}")
    entries = read_index(index_file)
    check_framing(record_file, entries)
    return len(entries)


def make_indexes(pairs: list[tuple[Path, Path]], workers: int) -> Iterator[int]:
    """The counts of `make_index` over (record file, index file) pairs, in order. `workers` tool processes
    run at a time, one wave after another, so a caller that stops early (a --limit) indexes no further."""
    workers = max(1, workers)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i in range(0, len(pairs), workers):
            yield from pool.map(lambda pair: make_index(*pair), pairs[i : i + workers])


def read_index(index_file: Path) -> list[tuple[int, int]]:
    """(offset, size) of every record an index file lists."""
    entries = []
    for lineno, line in enumerate(index_file.read_text().splitlines(), 1):
        parts = line.split()
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise DataError(f"{index_file}:{lineno}: expected '<offset> <size>', got {line!r}")
        entries.append((int(parts[0]), int(parts[1])))
    return entries


def check_framing(record_file: Path, entries: list[tuple[int, int]]) -> None:
    """DataError naming `record_file` unless `entries` tile it with records whose headers are whole."""
    size = record_file.stat().st_size
    if not entries:
        raise DataError(f"{record_file}: holds no TFRecord record ({size} bytes)")
    at = 0
    with open(record_file, "rb") as f:
        for k, (offset, length) in enumerate(entries):
            where = f"{record_file}: record {k} (byte {offset})"
            if offset != at:
                raise DataError(f"{where}: does not follow the previous record (expected byte {at})")
            f.seek(offset)
            header = f.read(HEADER_BYTES)
            if len(header) < HEADER_BYTES:
                raise DataError(
                    f"{where}: truncated inside its header ({len(header)} of {HEADER_BYTES} bytes)"
                )
            (payload,) = struct.unpack("<Q", header[:8])
            (stored,) = struct.unpack("<I", header[8:])
            if stored != masked_crc32c(header[:8]):
                raise DataError(f"{where}: length header fails its CRC; not a TFRecord file, or damaged")
            if length != payload + HEADER_BYTES + FOOTER_BYTES:
                raise DataError(
                    f"{where}: truncated: its header declares {payload} payload bytes, the file holds "
                    f"{max(0, length - HEADER_BYTES - FOOTER_BYTES)}"
                )
            at = offset + length
    if at != size:
        raise DataError(
            f"{record_file}: {size - at} bytes after the last whole record (truncated or not TFRecord)"
        )
