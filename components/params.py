"""Pipeline parameters: defaults for the embedded default run, and validation before any step starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from common.errors import ConfigError

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


@dataclass
class PipelineParams:
    """Every parameter of the pipeline, with the embedded default (Fashion-MNIST on a CPU) as defaults."""

    dataset: str = "fashion-mnist"
    source: str = STORE_SOURCE  # a path (mounted volume) or s3://bucket/prefix
    prepare_limit: int = 0  # 0: every image
    preset: str = "fmnist-cpu"
    overrides: str = ""  # "key=value key=value" over the preset
    steps: int = 300
    batch_size: int = 0  # 0: the preset's
    gpus: int = 0
    accelerator: str = "nvidia.com/gpu"
    seed: int = 0
    iw_samples: int = 50
    eval_limit: int = 200  # 0: the whole test split
    temperature: float = 0.8
    readjust_iters: int = 500
    num_samples: int = 64

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


_VALIDATED = ("preset", "dataset", "overrides", "steps", "gpus", "iw_samples", "temperature", "num_samples")


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
    ):
        if value < low:
            raise ConfigError(f"{name}={value} is out of range; allowed {name} >= {low}")
    if not (0 < temperature <= 10):
        raise ConfigError(f"temperature={temperature} is out of range; allowed 0 < temperature <= 10")
    cfg = build_config(preset, None, parse_set_args(split_overrides(overrides)[1::2]))
    if dataset != "image-folder" and cfg.dataset != dataset:
        raise ConfigError(f"preset {preset!r} is for dataset {cfg.dataset!r}, not {dataset!r}")
