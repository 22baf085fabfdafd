"""Glow's TFRecords of downsampled ImageNet, written in pure Python for the tests (protobuf by hand, CRC-32C
framing): the authors' ImageNet 32 and 64 source format.

Importable from any test module (pytest's `pythonpath` includes tests/).
"""

from __future__ import annotations

import struct

import numpy as np

from data.tfrecord import masked_crc32c


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def int64_feature(values: list[int]) -> bytes:  # Feature.int64_list (3) -> Int64List.value (1), packed
    return _field(3, _field(1, b"".join(_varint(v & (2**64 - 1)) for v in values)))


def bytes_feature(value: bytes) -> bytes:  # Feature.bytes_list (1) -> BytesList.value (1)
    return _field(1, _field(1, value))


def example(features: dict[str, bytes]) -> bytes:
    """A serialized tf.train.Example: Example.features (1) -> Features.feature (1), map<string, Feature>."""
    entries = b"".join(
        _field(1, _field(1, key.encode()) + _field(2, value)) for key, value in features.items()
    )
    return _field(1, entries)


def glow_example(image: np.ndarray, label: int = 0, shape: list[int] | None = None) -> bytes:
    """One record as Glow's generate_tfr writes it: 'shape' [H, W, C], raw HWC uint8 'data', 'label'."""
    shape = list(image.shape) if shape is None else shape
    return example(
        {
            "shape": int64_feature(shape),
            "data": bytes_feature(image.tobytes()),
            "label": int64_feature([label]),
        }
    )


def record(payload: bytes) -> bytes:
    """One TFRecord: uint64 length, masked CRC-32C of it, payload, masked CRC-32C of the payload."""
    length = struct.pack("<Q", len(payload))
    return (
        length
        + struct.pack("<I", masked_crc32c(length))
        + payload
        + struct.pack("<I", masked_crc32c(payload))
    )


def glow_record(image: np.ndarray, label: int = 0) -> bytes:
    """One framed Glow record of `image`."""
    return record(glow_example(image, label))
