"""Pipeline parameters: defaults for the embedded default run, and validation before any step starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from common.errors import ConfigError
from model.config import PRESETS

DATASETS = (
    "fashion-mnist",
    "mnist",
    "cifar10",
    "imagenet32",
    "celeba64",
    "celebahq256",
    "ffhq256",
    "image-folder",
)


LOCAL_SOURCE = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist, on this machine
STORE_SOURCE = "s3://nvae/raw/fashion-mnist"  # where `nvae data upload` puts it for a cluster
STORE_RUNS = "s3://nvae/runs"  # each run's checkpoints (and a TrainJob's data and outputs) under <run id>/


@dataclass
class PipelineParams:
    """Every parameter of the pipeline, with the embedded default (Fashion-MNIST on a CPU) as defaults."""

    dataset: str = "fashion-mnist"
    source: str = STORE_SOURCE  # a path (mounted volume) or s3://bucket/prefix
    prepare_limit: int = 0  # 0: every image
    preset: str = "fmnist-cpu"
    overrides: str = ""  # "key=value key=value" over the preset
    steps: int = 1000
    batch_size: int = 0  # 0: the preset's
    grad_accum: int = 1
    gpus: int = 0
    nodes: int = 1
    accelerator: str = "nvidia.com/gpu"
    checkpoint_store: str = STORE_RUNS  # "": checkpoints only in the step's output (no resume on retry)
    checkpoint_every: int = 200
    prepare_gpus: int = 0
    eval_gpus: int = 0
    sample_gpus: int = 0
    seed: int = 0
    iw_samples: int = 50
    eval_limit: int = 200  # 0: the whole test split
    temperature: float = 0.8
    readjust_iters: int = 500
    num_samples: int = 64
    registry: str = ""  # s3://bucket/models/<name>: publish the model there; "": do not publish

    @staticmethod
    def describe() -> dict[str, str]:
        """One line per parameter: what it means and its allowed values (KFP's run form shows these)."""
        return dict(DESCRIPTIONS)

    @classmethod
    def markdown_table(cls) -> str:
        """The run-form parameters as the Markdown table of docs/kubeflow.md (a test keeps them equal)."""
        rows = ["| parameter | default | meaning |", "|---|---|---|"]
        for name, value in asdict(cls()).items():
            shown = f'"{value}"' if value == "" else value
            rows.append(f"| `{name}` | `{shown}` | {DESCRIPTIONS[name]} |")
        return "\n".join(rows)

    @classmethod
    def from_overrides(cls, values: dict[str, Any]) -> PipelineParams:
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"unknown pipeline parameter {key!r}; known: {', '.join(known)}")
            kind = {"int": int, "float": float, "str": str}[str(known[name].type)]
            try:
                kwargs[name] = kind(value)
            except ValueError:
                raise ConfigError(
                    f"pipeline parameter {name}: expected {kind.__name__}, got {value!r}"
                ) from None
        params = cls(**kwargs)
        params.validate()
        return params

    def validate(self) -> None:
        validate_pipeline_args(**{k: v for k, v in asdict(self).items() if k in _VALIDATED})

    def as_arguments(self) -> dict[str, Any]:
        return asdict(self)


DESCRIPTIONS = {
    "dataset": f"Dataset recipe, one of: {', '.join(DATASETS)}.",
    "source": "Raw data: s3://bucket/prefix in the object store (nvae data upload), or a path on a mounted volume.",
    "prepare_limit": "Keep only the first N images of each split; 0 keeps all (>= 0).",
    "preset": f"Model recipe (nvae info --preset NAME): {', '.join(PRESETS)}.",
    "overrides": "Config fields over the preset, 'key=value key=value' (validated before any step).",
    "steps": "Training steps (>= 1).",
    "batch_size": "Images per process and step; 0 takes the preset's (>= 0).",
    "grad_accum": "Batches summed into each optimisation step (>= 1): nodes x gpus x grad_accum = the recipe's "
    "process count (nvae info) reaches the authors' global batch; BN still sees one batch.",
    "gpus": "GPUs for the training step (per node), one torchrun process each; 0 trains on CPU (>= 0).",
    "nodes": "Training nodes; above 1 the train step runs a Kubeflow TrainJob of that many nodes, each with "
    "`gpus` GPUs (>= 1; above 1 needs a checkpoint_store).",
    "accelerator": "Kubernetes accelerator resource of the steps' GPUs.",
    "checkpoint_store": "s3://bucket/prefix where training checkpoints go, under <run id>/: a retried train "
    "pod resumes there; empty: no store (a retry starts over).",
    "checkpoint_every": "Training steps between checkpoints; 0: only at the end (>= 0).",
    "prepare_gpus": "GPUs for DALI preparation, 0 or 1 (the GPU image when 1).",
    "eval_gpus": "GPUs for IW evaluation and BN readjustment, 0 or 1 (the GPU image when 1).",
    "sample_gpus": "GPUs for ONNX sampling (onnxruntime's CUDA provider), 0 or 1 (the GPU image when 1).",
    "seed": "Seed of training, sampling and evaluation noise.",
    "iw_samples": "Importance samples K per test image for the NLL bound (>= 1; 1000 for reported numbers).",
    "eval_limit": "Test images evaluated; 0 evaluates the whole test split (>= 0).",
    "temperature": "Sampling temperature for BN readjustment and the sample grid (0 < t <= 10).",
    "readjust_iters": "Batches of prior samples for BN readjustment (>= 1).",
    "num_samples": "Images in the sample grid (>= 1).",
    "registry": "Publish the decoder, checkpoint and metrics as a content-addressed version under this "
    "s3://bucket/models/<name> (nvae model list|pull); empty: do not publish.",
}

_VALIDATED = (
    "preset",
    "dataset",
    "overrides",
    "steps",
    "gpus",
    "iw_samples",
    "temperature",
    "num_samples",
    "prepare_limit",
    "batch_size",
    "eval_limit",
    "readjust_iters",
    "grad_accum",
    "prepare_gpus",
    "eval_gpus",
    "sample_gpus",
    "nodes",
    "checkpoint_store",
    "checkpoint_every",
)


def validate_pipeline_args(
    *,
    preset: str,
    dataset: str,
    overrides: str,
    steps: int,
    gpus: int,
    iw_samples: int,
    temperature: float,
    num_samples: int,
    prepare_limit: int = 0,
    batch_size: int = 0,
    eval_limit: int = 0,
    readjust_iters: int = 1,
    grad_accum: int = 1,
    prepare_gpus: int = 0,
    eval_gpus: int = 0,
    sample_gpus: int = 0,
    nodes: int = 1,
    checkpoint_store: str = "",
    checkpoint_every: int = 0,
) -> None:
    """Raise ConfigError naming the parameter and its allowed range; also checks preset + overrides."""
    from components.runtime import split_overrides
    from model.config import build_config, parse_set_args

    if dataset not in DATASETS:
        raise ConfigError(f"dataset={dataset!r} is not known; choose one of: {', '.join(DATASETS)}")
    for name, value, low in (
        ("steps", steps, 1),
        ("gpus", gpus, 0),
        ("iw_samples", iw_samples, 1),
        ("num_samples", num_samples, 1),
        ("prepare_limit", prepare_limit, 0),
        ("batch_size", batch_size, 0),
        ("eval_limit", eval_limit, 0),
        ("readjust_iters", readjust_iters, 1),
        ("nodes", nodes, 1),
        ("grad_accum", grad_accum, 1),
        ("checkpoint_every", checkpoint_every, 0),
    ):
        if value < low:
            raise ConfigError(f"{name}={value} is out of range; allowed {name} >= {low}")
    for name, value in (
        ("prepare_gpus", prepare_gpus),
        ("eval_gpus", eval_gpus),
        ("sample_gpus", sample_gpus),
    ):
        if value not in (0, 1):
            raise ConfigError(f"{name}={value} is out of range; allowed 0 <= {name} <= 1")
    if checkpoint_store and not checkpoint_store.startswith("s3://"):
        raise ConfigError(f"checkpoint_store={checkpoint_store!r}: expected s3://bucket/prefix, or empty")
    if checkpoint_store:
        from common.errors import StorageError
        from common.s3 import parse_s3_uri

        try:
            parse_s3_uri(checkpoint_store)
        except StorageError as exc:
            raise ConfigError(f"checkpoint_store: {exc}") from None
    if nodes > 1 and not checkpoint_store:
        raise ConfigError(
            f"nodes={nodes} needs a checkpoint_store: the TrainJob's nodes share data and "
            "checkpoints through it"
        )
    if not (0 < temperature <= 10):
        raise ConfigError(f"temperature={temperature} is out of range; allowed 0 < temperature <= 10")
    cfg = build_config(preset, None, parse_set_args(split_overrides(overrides)[1::2]))
    if dataset != "image-folder" and cfg.dataset != dataset:
        raise ConfigError(f"preset {preset!r} is for dataset {cfg.dataset!r}, not {dataset!r}")
