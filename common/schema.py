"""The schema of every file a user or another step hands us: a prepared dataset's manifest, the metrics of
`nvae evaluate`, the model registry's version manifests and `latest` pointer, and a checkpoint's metadata.
(A config YAML is checked field by field against `model.config.NVAEConfig`, the one definition of its types.)

Each is a pydantic model in strict mode, so a value's type is checked before its range: no boolean for an
integer, no string for a number, no float for an integer. Fields not named here are kept (newer writers may add
some). `check(Model, data, source)` returns the validated model, or raises one line naming the file and the
field, in the product's words: `<source>: <field>: expected <what>, got <value>`. Where a field says what it
expects (its `description`, or a model's `WHAT`), those are the words; otherwise pydantic's error kind gives
them.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from common.errors import NVAEError

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Version = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
# A file name inside one folder: no separator, not "." or "..", not hidden (which also rules out "..").
FileName = Annotated[str, StringConstraints(pattern=r"^[^/\\.][^/\\]*$")]
Name = Annotated[str, StringConstraints(min_length=1)]
PositiveInt = Annotated[int, Field(gt=0)]
Count = Annotated[int, Field(ge=0)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class Record(BaseModel):
    """A JSON object of a known kind: strict types, extra fields kept."""

    model_config = ConfigDict(strict=True, extra="allow")
    WHAT: ClassVar[str] = "a JSON object"
    NAME: ClassVar[str] = "file"  # how an error about the whole record names it


# ------------------------------------------------------------------------------------------ prepared data
class SplitEntry(Record):
    WHAT: ClassVar[str] = "a mapping with file, count and sha256"
    file: Name = Field(description="a file name")  # that it stays inside the folder: `data.loaders._inside`
    count: Count = Field(description="an integer >= 0")
    # Checked where the file is read (`data.loaders.verify_split`, naming the file), so that --no-verify still
    # reads a manifest without one.
    sha256: Any = None
    # A split stored whole along the longer side (`data.strips`): its index file, checked as `file` is.
    index: Name | None = Field(None, description="a file name")
    index_sha256: Any = None


class DataManifest(Record):
    """`manifest.json` of a folder written by `nvae prepare`."""

    NAME: ClassVar[str] = "manifest"
    dataset: Name = Field(description="a name")
    shape: list[PositiveInt] = Field(
        min_length=3, max_length=3, description="[height, width, channels], three positive integers"
    )
    bits: int = Field(ge=1, le=8, description="an integer from 1 to 8")
    flip: bool | None = Field(None, description="true or false")
    binarize: bool | None = Field(None, description="true or false")
    splits: dict[str, SplitEntry] = Field(min_length=1, description="a mapping of split names to entries")


# ---------------------------------------------------------------------------------------------- metrics
class EvalMetrics(Record):
    """The metrics JSON of `nvae evaluate`, as `plot-kl`, `model publish` and the pipeline's steps read it."""

    NAME: ClassVar[str] = "metrics"

    num_images: PositiveInt = Field(description="an integer > 0")
    iw_samples: PositiveInt = Field(description="an integer > 0")
    nll_bpd: Finite = Field(description="a finite number")
    nelbo_bpd: Finite = Field(description="a finite number")
    kl_per_group: list[Finite] = Field(min_length=1, description="a list of finite numbers, one per group")
    active_channels: Count | None = Field(None, description="an integer >= 0")
    dataset: Name | None = Field(None, description="a name")
    split: Name | None = Field(None, description="a split name")


# ------------------------------------------------------------------------------------------- the registry
class RegistryFile(Record):
    WHAT: ClassVar[str] = "a mapping with sha256 and size"
    sha256: Sha256 = Field(description="64 hex digits")
    size: Count = Field(description="an integer >= 0")


class RegistryManifest(Record):
    """`<version>/manifest.json` in the model registry (written last by a publish)."""

    NAME: ClassVar[str] = "manifest"

    name: Name = Field(description="the model's name")
    version: Version = Field(description="16 hex digits")
    created: str = Field(description="an ISO 8601 time")
    files: dict[FileName, RegistryFile] = Field(
        min_length=1, description="a mapping of plain file names to their sha256 and size"
    )
    card: dict[str, Any] = Field(description="the model card, a mapping")


class LatestPointer(Record):
    NAME: ClassVar[str] = "pointer"
    version: Version = Field(description="16 hex digits")


# ---------------------------------------------------------------------------------------------- checkpoints
class CheckpointPointer(Record):
    """`latest.json` of a checkpoint store in S3 (`training.storage`): the newest checkpoint and its hash."""

    NAME: ClassVar[str] = "pointer"
    key: Name = Field(description="an object key")
    step: Count = Field(description="an integer >= 0")
    sha256: Sha256 = Field(description="64 hex digits")
    bytes: Count = Field(description="an integer >= 0")


class BNReadjust(Record):
    WHAT: ClassVar[str] = "the settings of `nvae readjust-bn`"
    temperature: Finite = Field(gt=0, description="a finite number > 0")
    iters: PositiveInt | None = Field(None, description="an integer > 0")
    batch: PositiveInt | None = Field(None, description="an integer > 0")


class CheckpointMeta(Record):
    """A checkpoint's fields besides its tensors (`model.checkpoint`'s envelope, what training adds)."""

    model_config = ConfigDict(strict=True, extra="allow", arbitrary_types_allowed=True)
    WHAT: ClassVar[str] = "a checkpoint (a mapping of named entries)"
    NAME: ClassVar[str] = "checkpoint"
    format: Literal["nvae-pipeline-checkpoint"] = Field(description="'nvae-pipeline-checkpoint'")
    version: int = Field(description="an integer")
    # Required where a model is built from it (`model.checkpoint.check_model_entries`).
    config: str | None = Field(None, description="the config, a JSON object as text")
    model: dict[str, Any] | None = Field(None, description="a mapping of named weights")
    step: Count | None = Field(None, description="an integer >= 0")
    epoch: Count | None = Field(None, description="an integer >= 0")
    grad_accum: PositiveInt | None = Field(None, description="an integer > 0")
    total_steps: Count | None = Field(None, description="an integer >= 0")
    batches_per_epoch: PositiveInt | None = Field(None, description="an integer > 0")
    skipped: Count | None = Field(None, description="an integer >= 0")
    nonfinite_in_row: Count | None = Field(None, description="an integer >= 0")
    precision: str | None = Field(None, description="a precision name")
    bn_readjust: BNReadjust | None = Field(None, description=BNReadjust.WHAT)


# ----------------------------------------------------------------------------------------------- checking
_KINDS = {  # pydantic's error kinds, in the product's words
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "dict_type": "a mapping",
    "list_type": "a list",
    "model_type": "a JSON object",
    "finite_number": "a finite number",
}


def _shown(value: Any) -> str:
    if isinstance(value, bool | int | float | str | None):
        return json.dumps(value)
    if (
        isinstance(value, list)
        and len(value) <= 8
        and all(isinstance(v, bool | int | float | str) for v in value)
    ):
        return json.dumps(value)
    return type(value).__name__


def _unwrap(annotation: Any) -> Any:
    """The type inside `Annotated[...]` and `X | None`."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            rest = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(rest) != 1:
                return annotation
            annotation = rest[0]
        else:
            return annotation


def _where(model: type[Record], loc: tuple) -> tuple[int, str | None]:
    """How much of `loc` to name (a list's items are named by the list) and what is expected there."""
    current: Any = model
    what: str | None = model.WHAT
    for depth, part in enumerate(loc):
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            info = current.model_fields.get(str(part))
            if info is None:
                return depth, what
            current = info.annotation
            inner = _unwrap(current)
            what = info.description or (
                inner.WHAT if isinstance(inner, type) and issubclass(inner, Record) else None
            )
        elif typing.get_origin(current) is dict:
            current = typing.get_args(current)[1]
            inner = _unwrap(current)
            what = inner.WHAT if isinstance(inner, type) and issubclass(inner, Record) else what
        else:  # a list's item: the list is what is named
            return depth, what
    return len(loc), what


def _value_at(data: Any, loc: tuple) -> Any:
    for part in loc:
        data = data[part]
    return data


def message(exc: ValidationError, model: type[Record], data: Any, source: str) -> str:
    """The first error of `exc` as one line: `<source>: <field>: expected <what>, got <value>`."""
    error = exc.errors()[0]
    raw = tuple(error["loc"])
    if "[key]" in raw:  # a mapping's key is wrong: name the key, expect what the mapping says
        loc = raw[: raw.index("[key]")]
        _, what = _where(model, loc[:-1])
        return f"{source}: {'.'.join(map(str, loc))}: expected {what or 'another key'}, got {_shown(loc[-1])}"
    loc = tuple(p for p in raw if not (isinstance(p, str) and "[" in p))  # drop validator frames
    depth, what = _where(model, loc)
    field = ".".join(str(p) for p in loc[:depth]) or model.NAME
    if error["type"] == "missing":
        return f"{source}: {field}: missing (expected {what or 'a value'})"
    expected = what or _KINDS.get(error["type"], error["msg"][0].lower() + error["msg"][1:])
    try:
        value = _value_at(data, loc[:depth])
    except (KeyError, IndexError, TypeError):
        value = error.get("input")
    return f"{source}: {field}: expected {expected}, got {_shown(value)}"


M = typing.TypeVar("M", bound=Record)


def check(model: type[M], data: Any, source: str, error: type[NVAEError] = NVAEError) -> M:
    """`data` (parsed JSON, or a checkpoint's mapping) validated as `model`; `error` with one line naming
    `source` and the field when it is not."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(message(exc, model, data, source)) from None


def read_json(path: Any, model: type[M], error: type[NVAEError] = NVAEError, what: str = "file") -> M:
    """A JSON file validated as `model`: one line for a missing or unreadable file, a syntax error (with its
    line and column) or a field of the wrong type or range."""
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except json.JSONDecodeError as exc:
        raise error(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file (not JSON)") from None
    except OSError as exc:
        raise error(f"{path}: unreadable {what}: {exc.strerror or exc}") from None
    return check(model, data, str(path), error)
