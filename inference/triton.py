"""The Triton layout of an exported decoder: a model repository that stock runtimes serve as it is.

    <repository>/<name>/config.pbtxt      platform "onnxruntime_onnx", inputs and outputs, batching
    <repository>/<name>/1/model.onnx      the decoder (inference/export.py), temperature (batch, 1)

Triton Inference Server, KServe's `kserve-tritonserver` runtime (`modelFormat: onnx`) and OpenVINO Model
Server read this layout. Every name, data type and shape in `config.pbtxt` is read from the ONNX graph, so the
configuration cannot drift from the model. With `max_batch_size > 0` Triton leaves the batch dimension out of
`dims` and concatenates requests along it (dynamic batching): every input and output must then start with the
graph's dynamic batch dimension, which is why this layout exports the temperature as (batch, 1), one per image,
rather than (1,).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from common.errors import ConfigError, NVAEError
from common.files import atomic_write_text

log = logging.getLogger(__name__)

LAYOUTS = ("file", "triton")  # `nvae export-onnx --layout`
PLATFORM = "onnxruntime_onnx"
MODEL_FILE = "model.onnx"  # Triton's default file name for the onnxruntime backend
VERSION = "1"
MAX_QUEUE_DELAY_US = 1000  # how long Triton holds a request to batch it with others
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # one path component, starting with a letter or digit

# ONNX TensorProto.DataType -> Triton's model_config.proto DataType.
TRITON_DTYPES = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    4: "TYPE_UINT16",
    5: "TYPE_INT16",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    8: "TYPE_STRING",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    12: "TYPE_UINT32",
    13: "TYPE_UINT64",
    16: "TYPE_BF16",
}


class LayoutError(NVAEError):
    """An ONNX graph that the Triton layout cannot describe (e.g. an input without a batch dimension)."""


def check_settings(name: str, max_batch_size: int) -> None:
    """Raise ConfigError for a model name Triton cannot use as a folder, or a negative max_batch_size."""
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"model_name={name!r}: letters, digits, '_', '.', '-', not starting with '.' or '-'"
        )
    if isinstance(max_batch_size, bool) or max_batch_size < 0:
        raise ConfigError(f"max_batch_size={max_batch_size}: must be >= 0 (0: no batching by Triton)")


def model_file(repository: str | Path, name: str) -> Path:
    """`<repository>/<name>/1/model.onnx`."""
    return Path(repository) / name / VERSION / MODEL_FILE


def _ports(values, max_batch_size: int, where: str) -> list[tuple[str, str, list[int]]]:
    """(name, Triton data type, dims) per graph input or output; dims without the batch dimension when
    Triton batches, with -1 for every dynamic dimension."""
    ports = []
    for v in values:
        tensor = v.type.tensor_type
        if tensor.elem_type not in TRITON_DTYPES:
            raise LayoutError(f"{where} {v.name!r}: ONNX data type {tensor.elem_type} has no Triton type")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        if max_batch_size > 0:
            if not dims or dims[0] != -1:
                raise LayoutError(
                    f"{where} {v.name!r} has shape {dims}: with max_batch_size > 0 Triton needs a dynamic "
                    "batch dimension first (export with layout='triton', or use max_batch_size=0)"
                )
            dims = dims[1:]
        ports.append((v.name, TRITON_DTYPES[tensor.elem_type], dims))
    return ports


def triton_config(onnx_path: str | Path, *, name: str | None = None, max_batch_size: int = 64) -> str:
    """The `config.pbtxt` text for an ONNX model, read from the graph's inputs and outputs.

    `name` defaults to the model folder's name (`<name>/1/model.onnx`), which Triton requires it to equal."""
    import onnx

    onnx_path = Path(onnx_path)
    name = name or onnx_path.parent.parent.name
    check_settings(name, max_batch_size)
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    lines = [f'name: "{name}"', f'platform: "{PLATFORM}"', f"max_batch_size: {max_batch_size}"]
    for field, values in (("input", graph.input), ("output", graph.output)):
        entries = [
            f'  {{\n    name: "{port}"\n    data_type: {dtype}\n    dims: [ {", ".join(map(str, dims))} ]\n  }}'
            for port, dtype, dims in _ports(values, max_batch_size, field)
        ]
        lines.append(f"{field} [\n" + ",\n".join(entries) + "\n]")
    if max_batch_size > 0:
        lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}\n}}")
    lines.append("instance_group [\n  {\n    count: 1\n    kind: KIND_AUTO\n  }\n]")
    return "\n".join(lines) + "\n"


def write_config(onnx_path: str | Path, *, max_batch_size: int = 64) -> Path:
    """Write `config.pbtxt` beside the version folder of `<name>/1/model.onnx` (atomically); return its path."""
    onnx_path = Path(onnx_path)
    path = onnx_path.parent.parent / "config.pbtxt"
    atomic_write_text(path, triton_config(onnx_path, max_batch_size=max_batch_size))
    log.info("wrote the Triton model configuration %s", path)
    return path


__all__ = [
    "LAYOUTS",
    "TRITON_DTYPES",
    "LayoutError",
    "check_settings",
    "model_file",
    "triton_config",
    "write_config",
]
