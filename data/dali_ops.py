"""NVIDIA DALI pipelines of the preparation step: read TFRecords, decode, crop, resize and reduce bits, on GPU
or CPU.

Without a GPU, DALI runs in CPU mode (`device_id=None`, CPU operators only: the `mixed` decoder needs a GPU).
A pipeline that failed is no longer usable, so a failing batch is rebuilt and re-run one image at a time to
find the bad files.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import DataError

log = logging.getLogger(__name__)

DEVICES = ("auto", "gpu", "cpu")


def resolve_device(device: str) -> str:
    """'gpu' or 'cpu' for a requested 'auto' | 'gpu' | 'cpu'; DataError if a GPU is asked for but absent."""
    if device not in DEVICES:
        raise DataError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu"
    import torch

    has_gpu = torch.cuda.is_available()
    if device == "gpu" and not has_gpu:
        raise DataError("device 'gpu' requested but no CUDA device is available (use --device cpu or auto)")
    return "gpu" if has_gpu else "cpu"


def cpu_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _reduce_bits(images, bits: int):
    """uint8 0..255 -> uint8 0..2**bits-1, by floor division (as NVAE: floor(x / 2**(8 - bits)))."""
    from nvidia.dali import fn, types

    if bits == 8:
        return images
    return fn.cast(images // (2 ** (8 - bits)), dtype=types.UINT8)


def _build(graph: Callable[[], object], batch_size: int, device: str):
    from nvidia.dali import Pipeline

    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=cpu_threads(),
        device_id=0 if device == "gpu" else None,
        prefetch_queue_depth=1,
        exec_async=False,
        exec_pipelined=False,
        seed=0,
    )
    with pipe:
        pipe.set_outputs(graph())
    pipe.build()
    return pipe


def _to_numpy(output) -> np.ndarray:
    if hasattr(output, "as_cpu"):
        output = output.as_cpu()
    return output.as_array()


class ArrayPipeline:
    """Bit reduction of already-decoded uint8 (B, H, W, C) batches; the image decoder is skipped."""

    def __init__(self, bits: int, device: str, batch_size: int = 1024):
        self.bits, self.device, self.batch_size = bits, device, batch_size
        self._pipe = _build(self._graph, batch_size, device)

    def _graph(self):
        from nvidia.dali import fn, types

        images = fn.external_source(name="images", dtype=types.UINT8, ndim=3, layout="HWC")
        if self.device == "gpu":
            images = images.gpu()
        return _reduce_bits(images, self.bits)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """(B, H, W, C) uint8 -> (B, H, W, C) uint8 with values below 2**bits; B <= batch_size."""
        self._pipe.feed_input("images", np.ascontiguousarray(batch))
        (out,) = self._pipe.run()
        return _to_numpy(out)

    def ragged(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """The same on a list of uint8 (H, W, C) images of differing sizes (DALI batches are ragged)."""
        self._pipe.feed_input("images", [np.ascontiguousarray(a) for a in images])
        (out,) = self._pipe.run()
        if hasattr(out, "as_cpu"):
            out = out.as_cpu()
        return [np.array(out[i]) for i in range(len(images))]


@dataclass(frozen=True)
class DecodeFailure:
    """One image the decoder rejected."""

    path: Path
    reason: str


def _dali_cause(exc: Exception) -> str | None:
    """The first line of what DALI says it encountered, without its traceback of the pipeline definition."""
    text = str(exc)
    if "encountered:" in text:
        lines = [ln.strip() for ln in text.split("encountered:", 1)[1].splitlines() if ln.strip()]
        lines = [ln for ln in lines if "no longer valid" not in ln]
        if lines:
            return lines[0]
    return None


def _decoder_reason(exc: Exception) -> str:
    cause = _dali_cause(exc)
    return f"cannot be decoded ({cause})" if cause else "cannot be decoded"


class ImagePipeline:
    """Decode PNG/JPEG, crop (optional), resize shorter side to `size`, centre crop, reduce bits."""

    def __init__(
        self,
        size: int,
        bits: int,
        device: str,
        crop_rel: Sequence[float] | None = None,
        batch_size: int = 64,
    ):
        self.size, self.bits, self.device = size, bits, device
        self.crop_rel = tuple(crop_rel) if crop_rel else None
        self.batch_size = batch_size
        self._pipe = _build(self._graph, batch_size, device)

    def _graph(self):
        from nvidia.dali import fn, types

        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        decoder_device = "mixed" if self.device == "gpu" else "cpu"
        images = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
        if self.crop_rel:
            top, left, height, width = self.crop_rel
            images = fn.slice(images, rel_start=(top, left), rel_shape=(height, width), axis_names="HW")
        images = fn.resize(images, resize_shorter=self.size, interp_type=types.INTERP_LINEAR, antialias=True)
        images = fn.crop(images, crop=(self.size, self.size))
        return _reduce_bits(images, self.bits)

    def _rebuild(self) -> None:
        self._pipe = _build(self._graph, self.batch_size, self.device)

    def _run(self, encoded: list[np.ndarray]) -> np.ndarray:
        self._pipe.feed_input("encoded", encoded)
        (out,) = self._pipe.run()
        return _to_numpy(out)

    def __call__(self, items: list[tuple[Path, bytes]]) -> tuple[np.ndarray, list[Path], list[DecodeFailure]]:
        """Decode a batch of (path, encoded bytes).

        Returns the decoded images (B', size, size, 3) uint8, the paths they came from (in order), and
        the images that failed to decode (B' + failures = B).
        """
        encoded = [np.frombuffer(data, dtype=np.uint8) for _, data in items]
        try:
            return self._run(encoded), [p for p, _ in items], []
        except RuntimeError as exc:
            self._rebuild()
            if len(items) == 1:
                return self._empty(), [], [DecodeFailure(items[0][0], _decoder_reason(exc))]
        log.debug("decoder failed on a batch of %d; retrying image by image", len(items))
        good, paths, failures = [], [], []
        for item in items:
            arr, ok, bad = self([item])
            good.append(arr)
            paths += ok
            failures += bad
        return np.concatenate(good), paths, failures

    def _empty(self) -> np.ndarray:
        return np.zeros((0, self.size, self.size, 3), np.uint8)


# ------------------------------------------------------------------------------------------ TFRecords

_SOURCE_INFO = re.compile(r"(?P<file>.*) at index (?P<offset>\d+)")
_PARSE_ERROR = re.compile(r"Error while parsing TFRecord file: (?P<file>.*) at index (?P<offset>\d+)")


def _record_name(source_info: str) -> str:
    """'<file>: record at byte <offset>' from DALI's '<file> at index <offset>'."""
    m = _SOURCE_INFO.fullmatch(source_info)
    return f"{m['file']}: record at byte {m['offset']}" if m else source_info


class TFRecordImages:
    """Raw uint8 images from TFRecords of `tf.train.Example`s with features 'data' (the H*W*C bytes) and
    'shape' ([H, W, C]), read in file order by DALI's TFRecord reader (CPU: DALI has no GPU TFRecord reader).

    Other features ('label') are not read: NVAE trains unconditionally.
    """

    def __init__(self, side: int, channels: int = 3, batch_size: int = 1024):
        self.shape = (side, side, channels)
        self.batch_size = batch_size

    def _pipe(self, files: list[Path], indexes: list[Path], batch_size: int):
        from nvidia.dali import Pipeline, fn
        from nvidia.dali import tfrecord as tfrec

        pipe = Pipeline(
            batch_size=batch_size,
            num_threads=cpu_threads(),
            device_id=None,
            prefetch_queue_depth=1,
            exec_async=False,
            exec_pipelined=False,
            seed=0,
        )
        with pipe:
            records = fn.readers.tfrecord(
                path=[str(p) for p in files],
                index_path=[str(p) for p in indexes],
                features={
                    "data": tfrec.FixedLenFeature((), tfrec.string, ""),
                    "shape": tfrec.VarLenFeature(tfrec.int64, 0),
                },
                random_shuffle=False,
                pad_last_batch=True,
                name="records",
            )
            pipe.set_outputs(records["data"], records["shape"])
        pipe.build()
        return pipe

    def __call__(self, files: list[Path], indexes: list[Path], count: int) -> np.ndarray:
        """The first `count` records of `files` (in order) as uint8 (count, H, W, C); DataError naming the
        file and byte offset of a record that does not parse or does not hold one image of the expected shape."""
        out = np.empty((count, *self.shape), np.uint8)
        batch_size = min(self.batch_size, count)
        try:
            self._read(self._pipe(files, indexes, batch_size), out)
        except RuntimeError as exc:
            raise self._locate(files, indexes, count, exc) from None
        return out

    def _read(self, pipe, out: np.ndarray) -> None:
        at = 0
        while at < len(out):
            data, shape = pipe.run()
            take = min(len(data), len(out) - at)  # past `take`: padding, or records beyond `count`
            images = self._whole_batch(data, shape, take)
            if images is None:
                images = np.stack([self._one(data[k], shape[k]) for k in range(take)])
            out[at : at + take] = images
            at += take

    def _whole_batch(self, data, shape, take: int) -> np.ndarray | None:
        """The batch's first `take` images (take, H, W, C) when all are well formed, else None."""
        if not (data.is_dense_tensor() and shape.is_dense_tensor()):
            return None
        images, dims = data.as_array()[:take], shape.as_array()[:take]
        if (
            images.shape[1:] != (int(np.prod(self.shape)),)
            or dims.shape[1:] != (len(self.shape),)
            or (dims != self.shape).any()
        ):
            return None
        return images.reshape(take, *self.shape)

    def _one(self, data, shape) -> np.ndarray:
        image, dims = np.asarray(data), np.asarray(shape)  # a missing feature comes back as a 0-d tensor
        row = int(np.prod(self.shape))
        where = _record_name(data.source_info())
        for name, value in (("data", image), ("shape", dims)):
            if value.ndim != 1:
                raise DataError(f"{where}: has no '{name}' feature (Glow's records hold 'data' and 'shape')")
        if image.size != row or dims.tolist() != list(self.shape):
            raise DataError(
                f"{where}: holds {image.size} bytes of shape {dims.tolist()}; expected {row} bytes of shape "
                f"{list(self.shape)} (features 'data' and 'shape')"
            )
        return image.reshape(self.shape)

    def _locate(self, files: list[Path], indexes: list[Path], count: int, exc: RuntimeError) -> DataError:
        """A DataError naming the record DALI failed on: from its message, else by re-reading one record per
        batch (a missing feature only fails when batched with records that have it)."""
        located = _parse_failure(exc)
        if located is None:
            try:
                self._read(self._pipe(files, indexes, 1), np.empty((count, *self.shape), np.uint8))
            except DataError as found:
                located = found
            except RuntimeError as again:
                exc, located = again, _parse_failure(again)
        if located is not None:
            return located
        names = ", ".join(str(p) for p in files[:3]) + (
            f" and {len(files) - 3} more" if len(files) > 3 else ""
        )
        return DataError(f"{names}: DALI cannot read the TFRecords ({_dali_cause(exc) or 'no reason given'})")


def _parse_failure(exc: RuntimeError) -> DataError | None:
    """The DataError for DALI's 'Error while parsing TFRecord file: <file> at index <offset>', if that is it."""
    m = _PARSE_ERROR.search(str(exc))
    if m is None:
        return None
    return DataError(f"{m['file']}: record at byte {m['offset']}: not a tf.train.Example (cannot parse it)")
