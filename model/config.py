"""Typed NVAE configuration, the released presets as data, and validated overrides.

One flat set of named hyperparameters per preset (as openai/vdvae does); every field can be overridden from
the CLI (`key=value`) or a YAML file, and every value is checked against the allowed range of its field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from common.errors import ConfigError


def _rng(lo: float, hi: float, help: str = "") -> dict:
    return {"range": (lo, hi), "help": help}


def _choice(*values: Any, help: str = "") -> dict:
    return {"choices": values, "help": help}


@dataclass
class NVAEConfig:
    """Every hyperparameter of the model and its training recipe (names follow the paper)."""

    # --- data ---
    dataset: str = field(default="mnist", metadata={"help": "dataset the preset is for"})
    in_channels: int = field(default=1, metadata=_choice(1, 3, help="image channels"))
    data_size: int = field(default=28, metadata=_rng(4, 1024, "side of the stored images"))
    image_size: int = field(default=32, metadata=_rng(4, 1024, "side the network sees (zero-padded)"))
    likelihood: str = field(default="bernoulli", metadata=_choice("bernoulli", "dmol"))
    num_bits: int = field(default=8, metadata=_choice(5, 8, help="bits per channel (dmol)"))
    num_mix: int = field(default=10, metadata=_rng(1, 100, "logistic mixture components"))
    dmol_edge: str = field(
        default="correct",
        metadata=_choice("correct", "released", help="top-bin edge: correct, or the released x>0.99"),
    )
    binarize: bool = field(default=True, metadata={"help": "dynamic binarization of the training data"})
    flip: bool = field(default=False, metadata={"help": "horizontal flip augmentation"})

    # --- architecture ---
    channels: int = field(default=32, metadata=_rng(4, 1024, "channels after the stem (enc and dec)"))
    num_scales: int = field(default=2, metadata=_rng(1, 8, "latent spatial scales"))
    groups: int = field(default=10, metadata=_rng(1, 64, "latent groups at the finest scale"))
    ada_groups: bool = field(default=True, metadata={"help": "halve the groups at each coarser scale"})
    min_groups: int = field(default=1, metadata=_rng(1, 64, "lower bound of groups per scale"))
    z_channels: int = field(default=20, metadata=_rng(1, 256, "latent channels per group"))
    cells_enc: int = field(default=2, metadata=_rng(1, 8, "encoder cells per group"))
    cells_dec: int = field(default=2, metadata=_rng(1, 8, "decoder cells per group"))
    pre_blocks: int = field(default=2, metadata=_rng(0, 6, "preprocess blocks (each halves)"))
    pre_cells: int = field(default=3, metadata=_rng(1, 8, "cells per preprocess block"))
    post_blocks: int = field(default=2, metadata=_rng(0, 6, "postprocess blocks (each doubles)"))
    post_cells: int = field(default=3, metadata=_rng(1, 8, "cells per postprocess block"))
    num_nf: int = field(default=0, metadata=_rng(0, 8, "IAF flow pairs per group"))
    res_dist: bool = field(default=True, metadata={"help": "residual Normal posterior (Eq. 2)"})
    fused_bn_swish: bool = field(default=True, metadata={"help": "fused BN+Swish that recomputes"})

    # --- optimisation ---
    batch_size: int = field(default=200, metadata=_rng(1, 65536, "batch size per process"))
    recipe_processes: int = field(
        default=2,
        metadata=_rng(
            1, 4096, "processes (GPUs) the recipe was trained on: global batch = batch_size x this"
        ),
    )
    epochs: int = field(default=400, metadata=_rng(1, 100000, "training epochs"))
    lr: float = field(default=1e-2, metadata=_rng(1e-7, 1.0, "AdaMax learning rate"))
    lr_min: float = field(default=1e-4, metadata=_rng(0.0, 1.0, "final cosine learning rate"))
    warmup_epochs: float = field(default=5.0, metadata=_rng(0.0, 1000.0, "linear lr warm-up"))
    weight_decay: float = field(default=3e-4, metadata=_rng(0.0, 1.0, "AdaMax weight decay"))
    adamax_eps: float = field(default=1e-3, metadata=_rng(1e-12, 1.0, "AdaMax epsilon"))
    kl_anneal_portion: float = field(default=0.3, metadata=_rng(0.0, 1.0, "KL warm-up share of steps"))
    kl_const_portion: float = field(default=1e-4, metadata=_rng(0.0, 1.0, "share of steps at min beta"))
    kl_const_coeff: float = field(default=1e-4, metadata=_rng(0.0, 1.0, "minimum beta"))
    sr_lambda: float = field(default=1e-2, metadata=_rng(0.0, 100.0, "spectral/BN regularization lambda"))
    sr_lambda_init: float = field(default=1.0, metadata=_rng(1e-12, 100.0, "lambda at beta=0 if annealed"))
    sr_anneal: bool = field(default=False, metadata={"help": "anneal lambda log-linearly with beta"})
    sr_iters: int = field(default=4, metadata=_rng(1, 1000, "power iterations per step"))
    sr_iters_first: int = field(default=40, metadata=_rng(1, 10000, "power iterations at the first step"))

    # ---------------------------------------------------------------- derived values
    @property
    def groups_per_scale(self) -> list[int]:
        """Groups per latent scale, listed fine to coarse (the released `groups_per_scale`)."""
        out, n = [], self.groups
        for _ in range(self.num_scales):
            out.append(n)
            if self.ada_groups:
                n = max(self.min_groups, n // 2)
        return out

    @property
    def global_batch(self) -> int:
        """Images per optimisation step in the recipe: the authors' per-GPU batch times their GPU count."""
        return self.batch_size * self.recipe_processes

    @property
    def pad(self) -> int:
        return (self.image_size - self.data_size) // 2

    @property
    def total_downsample(self) -> int:
        return 2 ** (self.pre_blocks + self.num_scales - 1)

    @property
    def output_channels(self) -> int:
        """Channels of the decoder head: Bernoulli logits or DMoL parameters."""
        c = self.in_channels
        if self.likelihood == "bernoulli":
            return c
        # mixture logits + per channel (mean, log-scale) + PixelCNN++ coupling coefficients
        return self.num_mix * (1 + 2 * c + c * (c - 1) // 2)

    @property
    def dims(self) -> int:
        """Number of data dimensions the likelihood is reported over (bits/dim denominator)."""
        return self.in_channels * self.data_size * self.data_size

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> NVAEConfig:
        """The config a `to_dict` wrote (a checkpoint's, an export's): typed as written, checked by field."""
        return apply_overrides(cls(), values, source=source)

    def validate(self) -> NVAEConfig:
        for f in fields(self):
            _check_field(f, getattr(self, f.name))
        if self.image_size < self.data_size or (self.image_size - self.data_size) % 2:
            raise ConfigError(
                f"image_size={self.image_size} must be >= data_size={self.data_size} with an even difference"
            )
        if self.image_size % self.total_downsample:
            raise ConfigError(
                f"image_size={self.image_size} must be divisible by 2**(pre_blocks+num_scales-1)="
                f"{self.total_downsample}"
            )
        if self.likelihood == "bernoulli" and not self.binarize:
            raise ConfigError("likelihood=bernoulli needs binarize=true (binarized data)")
        if self.post_blocks != self.pre_blocks:
            raise ConfigError(
                f"post_blocks={self.post_blocks} must equal pre_blocks={self.pre_blocks} "
                "(postprocess undoes the preprocess resolution changes)"
            )
        return self


def _check_field(f: dataclasses.Field, value: Any) -> None:
    meta = f.metadata
    if f.type in ("bool", bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{f.name}: expected true/false, got {value!r}")
        return
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(map(str, meta["choices"]))
        raise ConfigError(f"{f.name}={value!r} is not allowed; choose one of: {allowed}")
    if "range" in meta:
        lo, hi = meta["range"]
        if not (lo <= value <= hi):
            raise ConfigError(f"{f.name}={value!r} is out of range; allowed {lo} <= {f.name} <= {hi}")


_FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _coerce(name: str, type_name: str, value: Any) -> Any:
    kind = _FIELD_TYPES[type_name]
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    try:
        return (
            kind(float(value))
            if kind is int and isinstance(value, str) and "e" in value.lower()
            else kind(value)
        )
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {type_name}, got {value!r}") from None


_TYPE_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def _typed(name: str, type_name: str, value: Any) -> None:
    """For a value read from a typed file (YAML, JSON): its type must be the field's before any conversion.
    No boolean for a number, no string for a number or a flag; an integer is a number too."""
    kind = _FIELD_TYPES[type_name]
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = (
            isinstance(value, int)
            and not isinstance(value, bool)
            or (isinstance(value, float) and value.is_integer())
        )
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        shown = (
            json.dumps(value) if isinstance(value, bool | int | float | str | None) else type(value).__name__
        )
        raise ConfigError(f"{name}: expected {_TYPE_WORDS[type_name]}, got {shown}")


def apply_overrides(cfg: NVAEConfig, overrides: dict[str, Any], source: str | None = None) -> NVAEConfig:
    """Return a validated copy of `cfg` with `overrides` applied; unknown keys are rejected by name.

    With `source` (the file the values were read from, typed: YAML or JSON), each value must already have its
    field's type, and errors name the file; without it (`--set` strings), values are converted."""
    known = {f.name: f for f in fields(NVAEConfig)}
    updates = {}
    try:
        for key, value in overrides.items():
            name = str(key).replace("-", "_")
            if name not in known:
                close = [k for k in known if k.startswith(name[:3])]
                hint = f" (did you mean: {', '.join(close)}?)" if close else ""
                raise ConfigError(f"unknown config field {key!r}{hint}")
            if source is not None:
                _typed(name, str(known[name].type), value)
            updates[name] = _coerce(name, str(known[name].type), value)
        return dataclasses.replace(cfg, **updates).validate()
    except ConfigError as exc:
        if source is None:
            raise
        raise ConfigError(f"{source}: {exc}") from None


def parse_set_args(items: list[str] | None) -> dict[str, str]:
    """Parse CLI `key=value` strings into a dict (values stay strings; apply_overrides types them)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def load_yaml_overrides(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:  # one line: file, line and column, and what the parser found
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{where}: not valid YAML: {what}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    return data


# The released recipe (NVAE_SPEC.md, "Released hyperparameters"), as data: overrides of the defaults,
# which are the binarized-MNIST recipe. `batch_size` is per GPU; `recipe_processes` is the number of GPUs the
# authors' README trains each recipe on (MNIST 2; CIFAR-10 and CelebA 64 8; ImageNet 32, CelebA HQ and FFHQ
# 24), so `global_batch` is the batch the paper's numbers come from.
_RGB = {"in_channels": 3, "likelihood": "dmol", "binarize": False, "flip": True}
_SMALL = {"pre_blocks": 1, "pre_cells": 2, "post_blocks": 1, "post_cells": 2}
# CelebA HQ 256 and FFHQ 256 share the 5-bit, five-scale recipe (lambda annealed from 1).
_HQ256 = {
    **_RGB,
    **_SMALL,
    "data_size": 256,
    "image_size": 256,
    "channels": 30,
    "num_scales": 5,
    "groups": 16,
    "min_groups": 4,
    "num_nf": 2,
    "num_bits": 5,
    "batch_size": 4,
    "recipe_processes": 24,
    "sr_anneal": True,
    "sr_lambda_init": 1.0,
}
_CELEBA64 = {
    **_RGB,
    **_SMALL,
    "dataset": "celeba64",
    "data_size": 64,
    "image_size": 64,
    "channels": 64,
    "num_scales": 3,
    "groups": 20,
    "num_nf": 1,
    "batch_size": 16,
    "recipe_processes": 8,
    "epochs": 90,
    "sr_lambda": 1e-1,
}
PRESETS: dict[str, dict[str, Any]] = {
    "mnist": {},
    # The authors' code trains on OMNIGLOT and stacked MNIST with MNIST's loaders (28x28, padded to 32); their
    # README gives no command for either, so both take MNIST's: OMNIGLOT binarized as MNIST, stacked MNIST as
    # three 8-bit channels under the logistic mixture (their model's likelihood for it).
    "omniglot": {"dataset": "omniglot"},
    "stacked-mnist": {"dataset": "stacked-mnist", "in_channels": 3, "likelihood": "dmol", "binarize": False},
    "cifar10": {
        **_RGB,
        **_SMALL,
        "dataset": "cifar10",
        "data_size": 32,
        "image_size": 32,
        "channels": 128,
        "num_scales": 1,
        "groups": 30,
        "num_nf": 1,
        "batch_size": 32,
        "recipe_processes": 8,
        "epochs": 400,
    },
    "imagenet32": {
        **_RGB,
        **_SMALL,
        "dataset": "imagenet32",
        "data_size": 32,
        "image_size": 32,
        "channels": 192,
        "num_scales": 1,
        "groups": 28,
        "num_nf": 1,
        "batch_size": 24,
        "recipe_processes": 24,
        "epochs": 45,
        "warmup_epochs": 1.0,
        "sr_anneal": True,
        "sr_lambda_init": 1.0,
    },
    "celeba64": _CELEBA64,
    # No command of the authors' README: CelebA 64's network (the authors' 64x64 recipe) on ImageNet 64 with
    # ImageNet 32's schedule, and on LSUN at 64 (other sides: --set data_size=N image_size=N).
    "imagenet64": {
        **_CELEBA64,
        "dataset": "imagenet64",
        "epochs": 45,
        "warmup_epochs": 1.0,
        "sr_lambda": 1e-2,
        "sr_anneal": True,
        "sr_lambda_init": 1.0,
    },
    **{name: {**_CELEBA64, "dataset": name} for name in ("lsun-bedroom", "lsun-church", "lsun-tower")},
    "celebahq256": {**_HQ256, "dataset": "celebahq256", "epochs": 300},
    "ffhq256": {**_HQ256, "dataset": "ffhq256", "epochs": 200, "sr_lambda": 1e-1, "lr": 8e-3},
    # Small preset of the same architecture that trains on a 2-core CPU in minutes: 8-bit grayscale
    # Fashion-MNIST with a discretized logistic mixture, two latent scales and one flow pair per group.
    "fmnist-cpu": {
        "dataset": "fashion-mnist",
        "likelihood": "dmol",
        "binarize": False,
        "channels": 16,
        "num_scales": 2,
        "groups": 4,
        "z_channels": 8,
        "cells_enc": 1,
        "cells_dec": 1,
        "pre_blocks": 1,
        "pre_cells": 2,
        "post_blocks": 1,
        "post_cells": 2,
        "num_nf": 1,
        "batch_size": 32,
        "recipe_processes": 1,
        "epochs": 1,
        "warmup_epochs": 0.1,
        "num_mix": 5,
    },
}


def get_preset(name: str) -> NVAEConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return apply_overrides(NVAEConfig(), PRESETS[name])


def build_config(
    preset: str, yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> NVAEConfig:
    """Preset, then YAML file, then CLI overrides; validated at every layer."""
    cfg = get_preset(preset)
    if yaml_path is not None:
        cfg = apply_overrides(cfg, load_yaml_overrides(yaml_path), source=str(yaml_path))
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg
