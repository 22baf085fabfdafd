"""Pipeline parameters: defaults for the embedded default run, and validation before any step starts.

Each parameter is listed once, as a field of `PipelineParams` whose metadata holds its run-form text and its
allowed values (`low`/`high` bounds or `choices`, as `NVAEConfig` does); the type checks, range checks, the
run form's descriptions and the docs' table all come from there. `validate_pipeline_args` adds the checks
that involve several parameters (a TrainJob needs a store; the preset must suit the dataset)."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from common.errors import ConfigError
from data.recipes import RECIPES
from model.config import PRESETS

# Every dataset a recipe exists for (data.recipes), the embedded default first.
DATASETS = tuple(sorted(RECIPES, key=lambda name: (name != "fashion-mnist", list(RECIPES).index(name))))


LOCAL_SOURCE = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist, on this machine
STORE_SOURCE = "s3://nvae/raw/fashion-mnist"  # where `nvae data upload` puts it for a cluster
STORE_RUNS = "s3://nvae/runs"  # each run's checkpoints (and a TrainJob's data and outputs) under <run id>/


def _param(
    default: Any,
    help: str,
    *,
    low: float | None = None,
    high: float | None = None,
    choices: tuple | None = None,
    checked: bool = True,
) -> Any:
    """A pipeline parameter: its default, its run-form text and its allowed values. `checked`: validate-params
    checks it (and so takes it as an input) before any step runs."""
    meta = {"help": help, "low": low, "high": high, "choices": choices, "checked": checked}
    return field(default=default, metadata=meta)


@dataclass
class PipelineParams:
    """Every parameter of the pipeline, with the embedded default (Fashion-MNIST on a CPU) as defaults."""

    dataset: str = _param(
        "fashion-mnist", f"Dataset recipe, one of: {', '.join(DATASETS)}.", choices=DATASETS
    )
    source: str = _param(
        STORE_SOURCE,
        "Raw data: s3://bucket/prefix in the object store (nvae data upload), or a path on a mounted volume.",
        checked=False,
    )
    prepare_limit: int = _param(0, "Keep only the first N images of each split; 0 keeps all (>= 0).", low=0)
    preset: str = _param("fmnist-cpu", f"Model recipe (nvae info --preset NAME): {', '.join(PRESETS)}.")
    overrides: str = _param(
        "", "Config fields over the preset, 'key=value key=value' (validated before any step)."
    )
    steps: int = _param(1000, "Training steps (>= 1).", low=1)
    batch_size: int = _param(0, "Images per process and step; 0 takes the preset's (>= 0).", low=0)
    grad_accum: int = _param(
        1,
        "Batches summed into each optimisation step (>= 1): nodes x gpus x grad_accum = the recipe's process "
        "count (nvae info) reaches the authors' global batch; BN still sees one batch.",
        low=1,
    )
    gpus: int = _param(
        0, "GPUs for the training step (per node), one torchrun process each; 0 trains on CPU (>= 0).", low=0
    )
    nodes: int = _param(
        1,
        "Training nodes; above 1 the train step runs a Kubeflow TrainJob of that many nodes, each with `gpus` "
        "GPUs (>= 1; above 1 needs a checkpoint_store).",
        low=1,
    )
    accelerator: str = _param(
        "nvidia.com/gpu", "Kubernetes accelerator resource of the steps' GPUs.", checked=False
    )
    trainjob_deadline_s: int = _param(
        604800,
        "Seconds a multi-node TrainJob may run before it is stopped and the step fails (>= 60; 604800: a week).",
        low=60,
    )
    trainer_api: str = _param(
        "2.2",
        "Kubeflow Trainer API form of the TrainJob: 2.2 (Trainer 2.2 and newer: runtimePatches and a job "
        "deadline) or 2.0 (Trainer 2.0 and 2.1: podTemplateOverrides; the step's deadline only).",
        choices=("2.2", "2.0"),
    )
    checkpoint_store: str = _param(
        STORE_RUNS,
        "s3://bucket/prefix where training checkpoints go, under <run id>/: a retried train pod resumes there; "
        "empty: no store (a retry starts over).",
    )
    checkpoint_every: int = _param(
        200, "Training steps between checkpoints; 0: only at the end (>= 0).", low=0
    )
    prepare_gpus: int = _param(0, "GPUs for DALI preparation, 0 or 1 (the GPU image when 1).", low=0, high=1)
    eval_gpus: int = _param(
        0, "GPUs for IW evaluation and BN readjustment, 0 or 1 (the GPU image when 1).", low=0, high=1
    )
    sample_gpus: int = _param(
        0,
        "GPUs for ONNX sampling (onnxruntime's CUDA provider), 0 or 1 (the GPU image when 1).",
        low=0,
        high=1,
    )
    seed: int = _param(0, "Seed of training, sampling and evaluation noise.", checked=False)
    iw_samples: int = _param(
        50, "Importance samples K per test image for the NLL bound (>= 1; 1000 for reported numbers).", low=1
    )
    eval_limit: int = _param(200, "Test images evaluated; 0 evaluates the whole test split (>= 0).", low=0)
    temperature: float = _param(
        0.8, "Sampling temperature for BN readjustment and the sample grid (0 < t <= 10).", low=0.0, high=10.0
    )
    readjust_iters: int = _param(500, "Batches of prior samples for BN readjustment (>= 1).", low=1)
    num_samples: int = _param(64, "Images in the sample grid (>= 1).", low=1)
    fid_samples: int = _param(
        0,
        "Samples for FID (pytorch-fid's Inception network) from the BN-readjusted model at `temperature`, "
        "against the prepared training set's statistics (one cached step per dataset); 0: no FID steps "
        "(>= 0; 50000 for reported numbers).",
        low=0,
    )
    fid_inception: str = _param(
        "",
        "pytorch-fid's Inception weights (pt_inception-2015-12-05-6726825d.pth, checked by its SHA-256): "
        "s3://bucket/key, or a path on a mounted volume; needed when fid_samples > 0.",
    )
    fid_inception_sha256: str = _param(
        "", "SHA-256 of other Inception weights in fid_inception, 64 hex digits; empty: pytorch-fid's file."
    )
    import_checkpoint: str = _param(
        "",
        "An authors' NVAE checkpoint (NVlabs/NVAE train.py, such as their released models): s3://bucket/key, "
        "or a path on a mounted volume. Set, the train step imports it instead of training (the training "
        "parameters are unused) and the later steps run on it; its dataset must be `dataset`. Empty: train.",
    )
    registry: str = _param(
        "",
        "Publish the decoder, checkpoint and metrics as a content-addressed version under this "
        "s3://bucket/models/<name> (nvae model list|pull); empty: do not publish.",
        checked=False,
    )

    @staticmethod
    def describe() -> dict[str, str]:
        """One line per parameter: what it means and its allowed values (KFP's run form shows these)."""
        return {f.name: f.metadata["help"] for f in fields(PipelineParams)}

    @classmethod
    def markdown_table(cls) -> str:
        """The run-form parameters as the Markdown table of docs/kubeflow.md (a test keeps them equal)."""
        rows = ["| parameter | default | meaning |", "|---|---|---|"]
        for f in fields(cls):
            shown = f'"{f.default}"' if f.default == "" else f.default
            rows.append(f"| `{f.name}` | `{shown}` | {f.metadata['help']} |")
        return "\n".join(rows)

    @classmethod
    def from_overrides(cls, values: dict[str, Any]) -> PipelineParams:
        """`name=value` settings (strings from the command line, or typed values) over the defaults, typed by
        each field and validated; an unknown name is refused with the closest known ones."""
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                close = difflib.get_close_matches(name, known, n=3)
                hint = f" (did you mean: {', '.join(close)}?)" if close else f"; known: {', '.join(known)}"
                raise ConfigError(f"unknown pipeline parameter {key!r}{hint}")
            kwargs[name] = _typed(known[name], value)
        params = cls(**kwargs)
        params.validate()
        return params

    def validate(self) -> None:
        validate_pipeline_args(**{name: getattr(self, name) for name in VALIDATED})

    def as_arguments(self) -> dict[str, Any]:
        return asdict(self)


FIELDS = {f.name: f for f in fields(PipelineParams)}
# What validate-params takes and checks, in the order of the fields.
VALIDATED = tuple(name for name, f in FIELDS.items() if f.metadata["checked"])


def _typed(f, value: Any) -> Any:
    """`value` as the field's type: a string from the command line is converted; a value of another type
    (a boolean for a number, a number for a string) is refused, naming the parameter."""
    kind = {"int": int, "float": float, "str": str}[str(f.type)]
    if isinstance(value, str) and kind is not str:
        try:
            return kind(value)
        except ValueError:
            raise ConfigError(
                f"pipeline parameter {f.name}: expected {kind.__name__}, got {value!r}"
            ) from None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind):
        raise ConfigError(f"pipeline parameter {f.name}: expected {kind.__name__}, got {value!r}")
    return kind(value)


def _check_field(name: str, value: Any) -> None:
    meta = FIELDS[name].metadata
    _typed(FIELDS[name], value)
    if meta["choices"] is not None and value not in meta["choices"]:
        what = "is not known" if name == "dataset" else "is not allowed"
        raise ConfigError(f"{name}={value!r} {what}; choose one of: {', '.join(map(str, meta['choices']))}")
    low, high = meta["low"], meta["high"]
    if name == "temperature":  # 0 < t: the lower bound is open
        if not (low < value <= high):
            raise ConfigError(f"temperature={value} is out of range; allowed 0 < temperature <= {high:g}")
    elif high is not None and not (low <= value <= high):
        raise ConfigError(f"{name}={value} is out of range; allowed {low} <= {name} <= {high}")
    elif low is not None and value < low:
        raise ConfigError(f"{name}={value} is out of range; allowed {name} >= {low}")


def validate_pipeline_args(**values: Any) -> None:
    """Raise ConfigError naming the parameter and its allowed range; also checks preset + overrides. `values`:
    the VALIDATED parameters (those missing take their defaults)."""
    from components.runtime import split_overrides
    from model.config import build_config, parse_set_args

    unknown = set(values) - set(VALIDATED)
    if unknown:
        raise ConfigError(f"not a validated pipeline parameter: {', '.join(sorted(unknown))}")
    v = {name: values.get(name, FIELDS[name].default) for name in VALIDATED}
    for name in VALIDATED:
        _check_field(name, v[name])
    store, nodes = v["checkpoint_store"], v["nodes"]
    if store and not store.startswith("s3://"):
        raise ConfigError(f"checkpoint_store={store!r}: expected s3://bucket/prefix, or empty")
    if store:
        from common.errors import StorageError
        from common.s3 import parse_s3_uri

        try:
            parse_s3_uri(store)
        except StorageError as exc:
            raise ConfigError(f"checkpoint_store: {exc}") from None
    if nodes > 1 and not store:
        raise ConfigError(
            f"nodes={nodes} needs a checkpoint_store: the TrainJob's nodes share data and checkpoints through it"
        )
    _check_object(v, "import_checkpoint")
    _check_object(v, "fid_inception")
    digest = v["fid_inception_sha256"]
    if digest and (len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower())):
        raise ConfigError(f"fid_inception_sha256={digest!r}: expected 64 hex digits, or empty")
    if v["fid_samples"] > 0 and not v["fid_inception"]:
        from inference.fid import WEIGHTS_URL

        raise ConfigError(
            f"fid_samples={v['fid_samples']} needs fid_inception: pytorch-fid's Inception weights as "
            f"s3://bucket/key or a path (download {WEIGHTS_URL} once and upload it to the store)"
        )
    cfg = build_config(v["preset"], None, parse_set_args(split_overrides(v["overrides"])[1::2]))
    if v["dataset"] != "image-folder" and cfg.dataset != v["dataset"]:
        raise ConfigError(f"preset {v['preset']!r} is for dataset {cfg.dataset!r}, not {v['dataset']!r}")


def _check_object(v: dict[str, Any], name: str) -> None:
    """Parameter `name` is empty, an absolute path, or s3://bucket/key naming one object; ConfigError if not."""
    source = v[name]
    if source and not source.startswith(("s3://", "/")):
        raise ConfigError(f"{name}={source!r}: expected s3://bucket/key, an absolute path, or empty")
    if source.startswith("s3://"):
        from common.errors import StorageError
        from common.s3 import parse_s3_uri

        try:
            key = parse_s3_uri(source)[1]
        except StorageError as exc:
            raise ConfigError(f"{name}: {exc}") from None
        if not key or source.endswith("/"):
            raise ConfigError(f"{name}={source!r} names no object; expected s3://bucket/key")
