"""The Open Inference Protocol v2 as the sampler speaks it: parsing infer requests, encoding images.

Shared by both servers (the built-in one, `serving.app`, and the KServe predictor, `serving.kserve_model`), so
a request means the same and is refused with the same message whichever answers it. Nothing here touches
the network or onnxruntime.

Infer request (JSON):

    {"inputs": [{"name": "n",           "datatype": "INT64", "shape": [1], "data": [16]},
                {"name": "temperature", "datatype": "FP32",  "shape": [1], "data": [0.7]},
                {"name": "seed",        "datatype": "INT64", "shape": [1], "data": [0]}],   # seed optional
     "parameters": {"format": "uint8"}}                                                 # optional

`format`: "uint8" (default) answers output `images`, UINT8 (n, H, W, C), row-major flat `data`;
"png" answers `images` as BYTES (n,): one base64-encoded PNG per image; "png_grid" answers `images` as
BYTES (1,): one base64 PNG of all images tiled. The response `parameters` carry the seed used (a random
one when none was given), the temperature and the decode mode, so any answer can be reproduced.

Every input the client must fix raises `BadRequest` with its HTTP status (400 for malformed, negative,
non-finite or out-of-range inputs, n above the per-request maximum, JSON nested deeper than `max_json_depth`
or with integers of more than 20 digits) and a message naming the field. `bearer_ok` checks the
`Authorization: Bearer <token>` header both servers require when a token is set.
"""

from __future__ import annotations

import base64
import hmac
import io
import json
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.config import ServeConfig
from serving.onnx_sampler import MAX_SEED

INT_TYPES = ("INT64", "INT32", "INT16", "INT8", "UINT64", "UINT32", "UINT16", "UINT8")
FLOAT_TYPES = ("FP32", "FP64", "FP16")
FORMATS = ("uint8", "png", "png_grid")


class BadRequest(Exception):
    """An input the client must fix: answered with `status` (4xx) and the message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def bearer_ok(authorization: str, token: bytes) -> bool:
    """Whether an `Authorization` header value is `Bearer <token>` (compared in constant time)."""
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)


# --------------------------------------------------------------------------- request parsing
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')
MAX_INT_DIGITS = 20  # 2**63 - 1 has 19


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BadRequest(f"integer with {len(text)} digits; at most {MAX_INT_DIGITS} are accepted")
    return int(text)


def _no_constant(name: str):
    raise BadRequest(f"{name} is not valid JSON")


def decode_json(raw: bytes, max_depth: int) -> Any:
    """json.loads with limits: nesting at most `max_depth` (checked before parsing, so a 5000-deep array
    cannot exhaust the recursion limit), integers of at most 20 digits, no NaN/Infinity; BadRequest else."""
    depth = 0
    for match in _JSON_TOKENS.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                raise BadRequest(f"JSON nested deeper than {max_depth} levels")
        elif token in (b"]", b"}"):
            depth -= 1
    try:
        return json.loads(raw, parse_int=_bounded_int, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(f"body is not valid JSON: {exc}") from None


@dataclass
class InferRequest:
    n: int
    temperature: float
    seed: int
    seed_given: bool
    format: str
    id: str | None


def _scalar(inp: dict[str, Any], types: tuple[str, ...]) -> Any:
    name = inp["name"]
    datatype = inp.get("datatype")
    if datatype not in types:
        raise BadRequest(f"input {name!r}: datatype {datatype!r}; expected {types[0]}")
    shape = inp.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise BadRequest(f"input {name!r}: shape must be a list of integers, e.g. [1]")
    if any(d != 1 for d in shape):  # [-1, -1] multiplies to 1 too
        raise BadRequest(f"input {name!r}: shape {shape} must hold exactly one element, e.g. [1]")
    data = inp.get("data")
    while isinstance(data, list) and len(data) == 1 and isinstance(data[0], list):
        data = data[0]
    if not isinstance(data, list) or len(data) != 1:
        raise BadRequest(f"input {name!r}: data must be a list with one value, e.g. [1]")
    value = data[0]
    if types is INT_TYPES:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"input {name!r}: {value!r} is not an integer")
    else:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRequest(f"input {name!r}: {value!r} is not a number")
        if not math.isfinite(value):
            raise BadRequest(f"input {name!r}: {value!r} is not finite")
    return value


def parse_infer(body: Any, cfg: ServeConfig) -> InferRequest:
    """Validate an OIP v2 infer request body (already JSON-decoded); BadRequest names the field."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object with an 'inputs' list")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty list")
    by_name: dict[str, dict] = {}
    for inp in inputs:
        if not isinstance(inp, dict) or not isinstance(inp.get("name"), str):
            raise BadRequest("every input must be an object with a 'name'")
        if inp["name"] not in ("n", "temperature", "seed"):
            raise BadRequest(f"unknown input {inp['name']!r}; inputs are n, temperature, seed")
        if inp["name"] in by_name:
            raise BadRequest(f"input {inp['name']!r} given twice")
        by_name[inp["name"]] = inp
    for required in ("n", "temperature"):
        if required not in by_name:
            raise BadRequest(f"missing input {required!r}")
    n = _scalar(by_name["n"], INT_TYPES)
    if not 1 <= n <= cfg.max_images_per_request:
        raise BadRequest(f"n={n} is out of range; allowed 1 <= n <= {cfg.max_images_per_request}")
    temperature = float(_scalar(by_name["temperature"], FLOAT_TYPES))
    if not 0 < temperature <= cfg.max_temperature:
        raise BadRequest(f"temperature={temperature} is out of range; allowed 0 < t <= {cfg.max_temperature}")
    seed_given = "seed" in by_name
    seed = _scalar(by_name["seed"], INT_TYPES) if seed_given else secrets.randbelow(2**31)
    if not 0 <= seed <= MAX_SEED:
        raise BadRequest(f"seed={seed} is out of range; allowed 0 <= seed <= 2**63 - 1")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be an object")
    fmt = params.get("format", "uint8")
    if fmt not in FORMATS:
        raise BadRequest(f"parameter format={fmt!r}; choose one of: {', '.join(FORMATS)}")
    outputs = body.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or any(
            not isinstance(o, dict) or o.get("name") != "images" for o in outputs
        ):
            raise BadRequest("'outputs' may only request the output 'images'")
    req_id = body.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise BadRequest("'id' must be a string")
    return InferRequest(n, temperature, int(seed), seed_given, fmt, req_id)


# --------------------------------------------------------------------------- response encoding
def to_uint8_nhwc(images: np.ndarray) -> np.ndarray:
    """(B, C, H, W) float in [0, 1] -> (B, H, W, C) uint8 (round half up, like `image_grid`)."""
    return (np.clip(images, 0, 1).transpose(0, 2, 3, 1) * 255 + 0.5).astype(np.uint8)


def tile(arr: np.ndarray, pad: int = 2) -> np.ndarray:
    """(B, H, W, C) uint8 -> one (H', W', C) grid, ceil(sqrt(B)) images a row, `pad` white pixels between
    (the layout of the training and `nvae sample` grids)."""
    b, h, w, c = arr.shape
    cols = max(1, math.ceil(math.sqrt(b)))
    rows = math.ceil(b / cols)
    cells = np.full((rows * cols, h + pad, w + pad, c), 255, dtype=np.uint8)
    cells[:b, :h, :w] = arr
    grid = cells.reshape(rows, cols, h + pad, w + pad, c).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * (h + pad), cols * (w + pad), c)
    return np.pad(grid, ((pad, 0), (pad, 0), (0, 0)), constant_values=255)


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


def encode_output(images: np.ndarray, fmt: str) -> dict[str, Any]:
    """The OIP output tensor `images` for float images (B, C, H, W) in [0, 1]."""
    arr = to_uint8_nhwc(images)
    if fmt == "uint8":
        return {"name": "images", "datatype": "UINT8", "shape": list(arr.shape), "data": arr.ravel().tolist()}
    if fmt == "png":
        data = [base64.b64encode(png_bytes(a)).decode("ascii") for a in arr]
        return {
            "name": "images",
            "datatype": "BYTES",
            "shape": [len(data)],
            "data": data,
            "parameters": {"content_type": "image/png", "encoding": "base64"},
        }
    grid = tile(arr)
    return {
        "name": "images",
        "datatype": "BYTES",
        "shape": [1],
        "data": [base64.b64encode(png_bytes(grid)).decode("ascii")],
        "parameters": {"content_type": "image/png", "encoding": "base64"},
    }
