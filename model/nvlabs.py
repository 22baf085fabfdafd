"""The authors' checkpoint format (NVlabs/NVAE `train.py`), read into ours and written from ours.

An authors' checkpoint is a `torch.save` of a dict: `state_dict` (their `AutoEncoder`'s weights), `args` (an
`argparse.Namespace` of the training command line), `arch_instance` (the cell types per tower), `epoch`,
`global_step`, and for resuming their training `optimizer`, `scheduler` and `grad_scalar`.

Reading (`read_nvlabs`, then `import_nvlabs`):
- The file is loaded with `torch.load(weights_only=True)`, with `argparse.Namespace` the one global allowed
  besides what weights-only loading allows anyway: a file that pickles anything else is refused before any of
  it is built, so no code in the file runs.
- The config comes from `args`, flag by flag (`ARGS_TO_CONFIG`). Flags that older checkpoints lack take the
  values the authors' `evaluate.py` gives them (`ada_groups` False, `min_groups_per_scale` 1,
  `num_mixture_dec` 10); training-only flags missing from a file take `train.py`'s defaults. A flag our
  network cannot express (another `arch_instance`, `use_se` off, different encoder and decoder widths, a
  Normal decoder, one group at one scale) is an error naming it.
- Weights are mapped name by name (`weight_map`), for every tensor of both networks: weight-norm gains
  (`log_weight_norm` -> `log_g`), BN statistics, SE, the flows, the learned decoder input. The mapping is
  strict: a missing or unexpected tensor, or a shape that differs, is an error naming the key. The only
  tensors of theirs without a counterpart are `weight_normalized`, an alias their plain convolutions register
  for the same weight (checked equal to it, then dropped). Our autoregressive masks are rebuilt from the
  architecture, and the spectral regularizer's vectors start afresh, as the authors' own `train.py` starts
  them when it resumes (their vectors are not saved).
- An RGB mixture's head lists its parameters in another order than ours: its output channels are permuted
  (`dmol_head_order`), which is exact.
- The likelihood keeps the authors' top-bin edge (`dmol_edge="released"`): the weights were trained with it,
  and their bits/dim were measured with it.
- A file with their optimizer also gives the run's training state (`training_state`): AdaMax's moments moved
  from their parameter order (`their_parameter_order`) to ours, their loss scale and step count, as the
  entries of our resume checkpoint, so `nvae train --continue-from` goes on with their run.

Writing (`export_nvlabs`): our checkpoint as theirs, so their `evaluate.py` runs on a model trained here.
The `args` are what their code needs to rebuild the same network; an extra `nvae_pipeline` entry, which their
code ignores, holds our config and spectral vectors, so ours -> theirs -> ours gives back every tensor bit
for bit.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.errors import CheckpointError, ConfigError
from model.config import NVAEConfig, apply_overrides

EXTRA_KEY = "nvae_pipeline"

# The cell types of the authors' `res_mbconv` architecture (`utils.get_arch_cells`), the one every released
# model uses and the one this network implements.
RES_MBCONV = {
    "normal_enc": ["res_bnswish", "res_bnswish"],
    "down_enc": ["res_bnswish", "res_bnswish"],
    "normal_dec": ["mconv_e6k5g0"],
    "up_dec": ["mconv_e6k5g0"],
    "normal_pre": ["res_bnswish", "res_bnswish"],
    "down_pre": ["res_bnswish", "res_bnswish"],
    "normal_post": ["mconv_e3k5g0"],
    "up_post": ["mconv_e3k5g0"],
    "ar_nn": [""],
}

# The authors' dataset name -> (our dataset name, image channels, stored side, network side). Their MNIST,
# OMNIGLOT and stacked-MNIST loaders pad 28x28 images to 32x32 and crop the likelihood back; every other set
# is square RGB.
DATASETS: dict[str, tuple[str, int, int, int]] = {
    "mnist": ("mnist", 1, 28, 32),
    "omniglot": ("omniglot", 1, 28, 32),
    "cifar10": ("cifar10", 3, 32, 32),
    "celeba_64": ("celeba64", 3, 64, 64),
    "celeba_256": ("celebahq256", 3, 256, 256),
    "imagenet_32": ("imagenet32", 3, 32, 32),
    "imagenet_64": ("imagenet64", 3, 64, 64),
    "ffhq": ("ffhq256", 3, 256, 256),
    "stacked_mnist": ("stacked-mnist", 3, 28, 32),
    "lsun_bedroom_128": ("lsun-bedroom", 3, 128, 128),
    "lsun_bedroom_256": ("lsun-bedroom", 3, 256, 256),
    "lsun_church_64": ("lsun-church", 3, 64, 64),
    "lsun_church_128": ("lsun-church", 3, 128, 128),
}
BINARY = {"mnist", "omniglot"}  # Bernoulli likelihood on dynamically binarized images

# args flag -> our config field, for the flags that shape the network or the likelihood.
ARGS_TO_CONFIG = {
    "num_channels_enc": "channels",
    "num_latent_scales": "num_scales",
    "num_groups_per_scale": "groups",
    "ada_groups": "ada_groups",
    "min_groups_per_scale": "min_groups",
    "num_latent_per_group": "z_channels",
    "num_cell_per_cond_enc": "cells_enc",
    "num_cell_per_cond_dec": "cells_dec",
    "num_preprocess_blocks": "pre_blocks",
    "num_preprocess_cells": "pre_cells",
    "num_postprocess_blocks": "post_blocks",
    "num_postprocess_cells": "post_cells",
    "num_nf": "num_nf",
    "res_dist": "res_dist",
}
# What `evaluate.py` gives a checkpoint that predates a flag.
EVALUATE_DEFAULTS = {"ada_groups": False, "min_groups_per_scale": 1, "num_mixture_dec": 10}
# Training flags -> our fields, with `train.py`'s defaults for files that lack them.
TRAINING_ARGS = {
    "batch_size": ("batch_size", 200),
    "epochs": ("epochs", 200),
    "learning_rate": ("lr", 1e-2),
    "learning_rate_min": ("lr_min", 1e-4),
    "warmup_epochs": ("warmup_epochs", 5),
    "weight_decay": ("weight_decay", 3e-4),
    "kl_anneal_portion": ("kl_anneal_portion", 0.3),
    "kl_const_portion": ("kl_const_portion", 1e-4),
    "kl_const_coeff": ("kl_const_coeff", 1e-4),
    "weight_decay_norm": ("sr_lambda", 0.0),
    "weight_decay_norm_init": ("sr_lambda_init", 10.0),
    "weight_decay_norm_anneal": ("sr_anneal", False),
}
# The rest of `train.py`'s command line, for the args of an exported checkpoint.
TRAIN_PY_DEFAULTS = {
    "root": "/tmp/nasvae/expr",
    "save": "exp",
    "data": "/tmp/nasvae/data",
    "fast_adamax": False,
    "num_x_bits": 8,
    "cont_training": False,
    "num_proc_node": 1,
    "node_rank": 0,
    "local_rank": 0,
    "global_rank": 0,
    "num_process_per_node": 1,
    "master_address": "127.0.0.1",
    "seed": 1,
    "distributed": False,
}
REQUIRED_ARGS = (
    "dataset",
    "arch_instance",
    "use_se",
    "num_channels_dec",
    "num_x_bits",
    *(flag for flag in ARGS_TO_CONFIG if flag not in EVALUATE_DEFAULTS),
)
# Our fields that `args` does not carry: on import they keep our defaults (or an exported file's values).
NOT_IN_ARGS = ("fused_bn_swish", "adamax_eps", "sr_iters", "sr_iters_first")


# ------------------------------------------------------------------------------------------ safe loading


def load_nvlabs_file(path: str | Path) -> dict[str, Any]:
    """The authors' checkpoint as a dict, loaded with weights_only and `argparse.Namespace` allowed."""
    return _checked_nvlabs(_safe_load(path), Path(path))


def _safe_load(path: str | Path) -> Any:
    """`torch.load(weights_only=True)` with `argparse.Namespace` allowed; CheckpointError in one line for a
    missing, unreadable or refused file."""
    from model.checkpoint import load_weights_only

    return load_weights_only(path, allowed=(argparse.Namespace,))


def _checked_nvlabs(payload: Any, path: Path) -> dict[str, Any]:
    """`payload` if it has the entries of an authors' checkpoint; CheckpointError naming what is wrong."""
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not an authors' NVAE checkpoint (not a dict)")
    missing = [k for k in ("state_dict", "args") if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: not an authors' NVAE checkpoint (no {' or '.join(missing)} entry)")
    if not isinstance(payload["args"], argparse.Namespace):
        raise CheckpointError(
            f"{path}: 'args' is a {type(payload['args']).__name__}, not an argparse.Namespace"
        )
    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: 'state_dict' is not a dict of tensors")
    return payload


# ------------------------------------------------------------------------------------------ args <-> config


def _flag(args: argparse.Namespace, name: str) -> Any:
    if hasattr(args, name):
        return getattr(args, name)
    if name in EVALUATE_DEFAULTS:
        return EVALUATE_DEFAULTS[name]
    raise CheckpointError(f"args.{name} is missing: the checkpoint does not say how to build the network")


def config_from_args(args: argparse.Namespace, arch_instance: Any = None) -> NVAEConfig:
    """Our config for the network and recipe that `args` describe; CheckpointError naming the flag when our
    network cannot express it."""
    for name in REQUIRED_ARGS:
        _flag(args, name)
    dataset = args.dataset
    if dataset not in DATASETS:
        raise CheckpointError(f"args.dataset={dataset!r}: not one of {', '.join(DATASETS)}")
    if args.arch_instance != "res_mbconv":
        raise CheckpointError(f"args.arch_instance={args.arch_instance!r}: only 'res_mbconv' is implemented")
    if arch_instance is not None and arch_instance != RES_MBCONV:
        raise CheckpointError(
            "arch_instance: the cells differ from res_mbconv's, which args.arch_instance names"
        )
    if args.use_se is not True:
        raise CheckpointError(
            f"args.use_se={args.use_se!r}: every cell of this network has squeeze-excitation"
        )
    if args.num_channels_dec != args.num_channels_enc:
        raise CheckpointError(
            f"args.num_channels_dec={args.num_channels_dec!r}: must equal args.num_channels_enc="
            f"{args.num_channels_enc!r} (one width for both towers)"
        )
    if args.num_latent_scales == 1 and args.num_groups_per_scale == 1:
        raise CheckpointError("args.num_latent_scales=1 with args.num_groups_per_scale=1: the 'vanilla VAE' "
                              "variant has no towers, and this network does not implement it")  # fmt: skip
    ours, channels, data_size, image_size = DATASETS[dataset]
    values: list[tuple[str, str, Any]] = [
        ("dataset", "dataset", ours),
        ("dataset", "in_channels", channels),
        ("dataset", "data_size", data_size),
        ("dataset", "image_size", image_size),
        ("dataset", "binarize", dataset in BINARY),
        ("dataset", "likelihood", "bernoulli" if dataset in BINARY else "dmol"),
        (
            "dataset",
            "flip",
            dataset not in BINARY | {"stacked_mnist"},
        ),  # their stacked-MNIST loader never flips
        ("dataset", "dmol_edge", "released"),
    ]
    values += [(flag, field, _flag(args, flag)) for flag, field in ARGS_TO_CONFIG.items()]
    if dataset not in BINARY:
        mix = _flag(args, "num_mixture_dec")
        if mix == 1:
            raise CheckpointError(
                "args.num_mixture_dec=1: the Normal decoder is not implemented (10 mixtures is)"
            )
        values += [("num_mixture_dec", "num_mix", mix), ("num_x_bits", "num_bits", args.num_x_bits)]
    for flag, (field, default) in TRAINING_ARGS.items():
        values.append((flag, field, getattr(args, flag, default)))
    processes = getattr(args, "num_proc_node", 1) * getattr(args, "num_process_per_node", 1)
    values.append(("num_process_per_node", "recipe_processes", processes))

    overrides = {field: float(v) if field == "warmup_epochs" else v for _, field, v in values}
    try:
        return apply_overrides(NVAEConfig(), overrides).validate()
    except ConfigError as exc:
        named = [(flag, field) for flag, field, _ in values if field in str(exc) and flag != "dataset"]
        if named:  # the flag behind the field the message names
            flag, field = named[0]
            raise CheckpointError(f"args.{flag}={overrides[field]!r}: {exc}") from None
        raise CheckpointError(f"args (dataset {dataset!r}): {exc}") from None


def args_from_config(cfg: NVAEConfig) -> argparse.Namespace:
    """The authors' `args` for our config: what their `AutoEncoder`, `evaluate.py` and `train.py` read."""
    names = {ours: theirs for theirs, (ours, *_rest) in DATASETS.items()}
    if cfg.dataset not in names:
        raise CheckpointError(f"dataset={cfg.dataset!r}: the authors' code has no such dataset")
    dataset = names[cfg.dataset]
    _, channels, data_size, image_size = DATASETS[dataset]
    binary = dataset in BINARY
    expected = {"in_channels": channels, "data_size": data_size, "image_size": image_size,
                "likelihood": "bernoulli" if binary else "dmol", "binarize": binary}  # fmt: skip
    for field, value in expected.items():  # what their loader for the dataset gives
        if getattr(cfg, field) != value:
            raise CheckpointError(
                f"{field}={getattr(cfg, field)!r}: the authors' {dataset} loader gives {value!r}"
            )
    if cfg.likelihood == "dmol" and cfg.dmol_edge != "released":
        raise CheckpointError("dmol_edge='correct': the authors' code computes the likelihood with the released "
                              "edge; export a model trained with dmol_edge=released")  # fmt: skip
    values = dict(TRAIN_PY_DEFAULTS)
    values.update(dataset=dataset, arch_instance="res_mbconv", use_se=True, num_channels_dec=cfg.channels)
    values.update({flag: getattr(cfg, field) for flag, field in ARGS_TO_CONFIG.items()})
    values.update({flag: getattr(cfg, field) for flag, (field, _) in TRAINING_ARGS.items()})
    values["warmup_epochs"] = (
        int(round(cfg.warmup_epochs)) if float(cfg.warmup_epochs).is_integer() else cfg.warmup_epochs
    )
    values.update(
        num_mixture_dec=cfg.num_mix, num_x_bits=cfg.num_bits, num_process_per_node=cfg.recipe_processes
    )
    return argparse.Namespace(**values)


# ------------------------------------------------------------------------------------------ weight names


@dataclass(frozen=True)
class WeightMap:
    """`pairs`: (their key, our key) for every tensor; `aliases`: their `weight_normalized` key -> the key of
    the weight it aliases (their plain convolutions); `bn_wrapped`: their keys that carry the `.bn.` of their
    SyncBatchNorm wrapper (absent when they trained with plain BatchNorm2d); `head_order`: for an RGB
    mixture, where each of our head's output channels sits in theirs (`dmol_head_order`)."""

    pairs: list[tuple[str, str]]
    aliases: dict[str, str]
    bn_wrapped: frozenset[str]
    head_order: list[int] | None = None  # ours[i] = theirs[head_order[i]] along the head's output channels


def weight_map(cfg: NVAEConfig) -> WeightMap:
    """Their state-dict keys and ours for the network of `cfg`, walking both towers in construction order."""
    pairs: list[tuple[str, str]] = []
    aliases: dict[str, str] = {}
    wrapped: set[str] = set()

    def conv(t: str, o: str, bias: bool = True, wn: bool = True) -> None:
        pairs.append((f"{t}.weight", f"{o}.weight"))
        if bias:
            pairs.append((f"{t}.bias", f"{o}.bias"))
        if wn:
            pairs.append((f"{t}.log_weight_norm", f"{o}.log_g"))
        else:
            aliases[f"{t}.weight_normalized"] = f"{t}.weight"

    def bn(t: str, o: str, sync_wrapper: bool = False) -> None:
        for leaf in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            key = f"{t}.bn.{leaf}" if sync_wrapper else f"{t}.{leaf}"
            pairs.append((key, f"{o}.{leaf}"))
            if sync_wrapper:
                wrapped.add(key)

    def se(t: str, o: str) -> None:
        for theirs, ours in (("se.0", "fc1"), ("se.2", "fc2")):
            pairs.extend(
                [(f"{t}.{theirs}.weight", f"{o}.{ours}.weight"), (f"{t}.{theirs}.bias", f"{o}.{ours}.bias")]
            )

    def enc_cell(t: str, o: str, down: bool) -> None:
        if down:
            for i in range(4):
                conv(f"{t}.skip.conv_{i + 1}", f"{o}.skip.convs.{i}")
        bn(f"{t}._ops.0.bn_act", f"{o}.branch.0")
        conv(f"{t}._ops.0.conv_0", f"{o}.branch.1")
        bn(f"{t}._ops.1.bn_act", f"{o}.branch.2")
        conv(f"{t}._ops.1.conv_0", f"{o}.branch.3")
        se(f"{t}.se", f"{o}.branch.4")

    def dec_cell(t: str, o: str, up: bool) -> None:
        k = 1 if up else 0  # their nn.UpsamplingNearest2d and our _NearestUp come first in an up cell
        if up:
            conv(f"{t}.skip.1", f"{o}.skip.conv", bias=False)
        c = f"{t}._ops.0.conv"
        bn(f"{c}.{k}", f"{o}.branch.{k}", sync_wrapper=True)
        conv(f"{c}.{k + 1}.conv.0", f"{o}.branch.{k + 1}", bias=False, wn=False)
        bn(f"{c}.{k + 1}.conv.1", f"{o}.branch.{k + 2}")
        conv(f"{c}.{k + 2}.conv.0", f"{o}.branch.{k + 3}", bias=False, wn=False)
        bn(f"{c}.{k + 2}.conv.1", f"{o}.branch.{k + 4}")
        conv(f"{c}.{k + 3}", f"{o}.branch.{k + 5}", bias=False, wn=False)
        bn(f"{c}.{k + 4}", f"{o}.branch.{k + 6}", sync_wrapper=True)
        se(f"{t}.se", f"{o}.branch.{k + 7}")

    gps = cfg.groups_per_scale  # fine to coarse
    pairs.append(("prior_ftr0", "h"))
    conv("stem", "stem")
    i = 0
    for _ in range(cfg.pre_blocks):
        for c in range(cfg.pre_cells):
            enc_cell(f"pre_process.{i}", f"preprocess.{i}", down=c == cfg.pre_cells - 1)
            i += 1
    t = k = kc = 0  # their enc_tower index; our group and combiner indices
    for s in range(cfg.num_scales):
        for g in range(gps[s]):
            for c in range(cfg.cells_enc):
                enc_cell(f"enc_tower.{t}", f"enc_groups.{k}.{c}", down=False)
                t += 1
            k += 1
            if not (s == cfg.num_scales - 1 and g == gps[s] - 1):
                conv(f"enc_tower.{t}.conv", f"enc_combiners.{kc}.conv")
                t, kc = t + 1, kc + 1
        if s < cfg.num_scales - 1:
            enc_cell(f"enc_tower.{t}", f"enc_down.{s}", down=True)
            t += 1
    conv("enc0.1", "enc0.1")
    for j in range(sum(gps)):  # samplers and flows per group, coarse first
        conv(f"enc_sampler.{j}", f"enc_sampler.{j}")
        for n in range(cfg.num_nf):
            for cell in ("cell1", "cell2"):
                their, our = f"nf_cells.{j * cfg.num_nf + n}.{cell}", f"flows.{j}.{n}.{cell}"
                conv(f"{their}.conv.convz.0", f"{our}.conv1", bias=False)
                conv(f"{their}.conv.convz.2", f"{our}.conv2", bias=False)
                conv(f"{their}.mu.conv_0", f"{our}.shift")
        if j > 0:
            conv(f"dec_sampler.{j - 1}.1", f"dec_sampler.{j - 1}.1")
    t = j = 0
    for s in range(cfg.num_scales):
        for g in range(gps[cfg.num_scales - 1 - s]):
            if not (s == 0 and g == 0):
                for c in range(cfg.cells_dec):
                    dec_cell(f"dec_tower.{t}", f"dec_groups.{j}.{c}", up=False)
                    t += 1
            conv(f"dec_tower.{t}.conv", f"dec_combiners.{j}.conv")
            t, j = t + 1, j + 1
        if s < cfg.num_scales - 1:
            dec_cell(f"dec_tower.{t}", f"dec_up.{s}", up=True)
            t += 1
    i = 0
    for _ in range(cfg.post_blocks):
        for c in range(cfg.post_cells):
            dec_cell(f"post_process.{i}", f"postprocess.{i}", up=c == 0)
            i += 1
    conv("image_conditional.1", "head.1")
    order = dmol_head_order(cfg.num_mix) if cfg.likelihood == "dmol" and cfg.in_channels == 3 else None
    return WeightMap(pairs, aliases, frozenset(wrapped), order)


HEAD_KEYS = ("head.1.weight", "head.1.bias", "head.1.log_g")


def dmol_head_order(m: int) -> list[int]:
    """The two layouts of an RGB mixture's parameters, as a permutation of the head's output channels.

    Both start with the M mixture logits. Theirs (`DiscMixLogistic`) then holds, per colour channel c, M
    means, M log-scales and M coupling coefficients; ours (`DiscretizedLogisticMixture`) holds all means, then
    all log-scales, then the coefficients. The coefficient set k (green on red, blue on red, blue on green)
    is their channel k's third block. Permuting a convolution's output channels (weight, bias and per-channel
    weight-norm gain alike) is exact, so the imported head computes the same distribution."""
    order = list(range(m))
    for kind in range(3):  # means, log-scales, coefficients
        for c in range(3):
            order += [m + c * 3 * m + kind * m + i for i in range(m)]
    return order


def ours_only(key: str) -> bool:
    """Our tensors that the authors' file has no counterpart for: rebuilt (AR masks) or started afresh
    (the spectral regularizer's vectors)."""
    return key.endswith(".mask") or key.startswith("spectral.")


# ------------------------------------------------------------------------------------------ import / export


@dataclass
class Imported:
    config: NVAEConfig
    state: dict[str, torch.Tensor]
    epoch: int | None
    global_step: int | None
    bn_form: str  # "sync" (their default SyncBatchNorm wrapper) or "plain"
    # The run's training state as the entries of our resume checkpoint (`training_state`), when the file holds
    # their optimizer; None for a file of weights only.
    training: dict[str, Any] | None = None


def import_nvlabs(payload: dict[str, Any], source: str = "checkpoint", training: bool = True) -> Imported:
    """Our config and state dict for an authors' checkpoint `payload` (from `load_nvlabs_file`), and with
    `training` the run's state when the file holds their optimizer; the mapping is strict (CheckpointError
    naming the key or flag)."""
    from model.network import NVAE

    args = payload["args"]
    cfg = config_from_args(args, payload.get("arch_instance"))
    extra = payload.get(EXTRA_KEY)
    if extra is not None:
        cfg = _with_exported_fields(cfg, extra, source)
    theirs = payload["state_dict"]
    wmap = weight_map(cfg)
    bn_form = "sync" if any(k in theirs for k in wmap.bn_wrapped) else "plain"
    pairs = [(_plain_bn(t) if bn_form == "plain" and t in wmap.bn_wrapped else t, o) for t, o in wmap.pairs]

    with torch.random.fork_rng(devices=[]):  # the spectral vectors' start: one file, one import, bit for bit
        torch.manual_seed(0)
        model = NVAE(cfg)
    own = model.state_dict()
    mapped = {o for _, o in pairs}
    unmapped = [k for k in own if k not in mapped and not ours_only(k)]
    if unmapped:  # a network this module does not know how to name: a bug here, never a partial model
        raise CheckpointError(f"internal: no authors' name for our tensor {unmapped[0]}")
    state = dict(own)
    for t, o in pairs:
        if t not in theirs:
            raise CheckpointError(f"{source}: missing tensor {t} (for {o}) in the authors' state_dict")
        tensor = theirs[t]
        if tuple(tensor.shape) != tuple(own[o].shape):
            raise CheckpointError(
                f"{source}: tensor {t} has shape {tuple(tensor.shape)}, the network of its args needs "
                f"{tuple(own[o].shape)}"
            )
        if tensor.dtype.is_floating_point != own[o].dtype.is_floating_point:
            raise CheckpointError(f"{source}: tensor {t} is {tensor.dtype}, {own[o].dtype} is needed")
        if wmap.head_order is not None and o in HEAD_KEYS:
            tensor = tensor[wmap.head_order]
        state[o] = tensor.detach().to(own[o].dtype).clone()
    used = {t for t, _ in pairs}
    for alias, weight in wmap.aliases.items():
        if alias in theirs:
            if not torch.equal(theirs[alias], theirs[weight]):
                raise CheckpointError(f"{source}: tensor {alias} differs from {weight}, which it aliases")
            used.add(alias)
    unexpected = sorted(set(theirs) - used)
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensor {unexpected[0]} in the authors' state_dict"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + ": the file and its args describe different networks"
        )
    if extra is not None:
        for key, tensor in extra.get("tensors", {}).items():
            if key not in own or not ours_only(key) or tensor.shape != own[key].shape:
                raise CheckpointError(f"{source}: {EXTRA_KEY} entry {key} does not fit the network")
            state[key] = tensor.clone()
    model.load_state_dict(state)  # strict: every key of ours is set
    epoch, step = payload.get("epoch"), payload.get("global_step")
    epoch = epoch if isinstance(epoch, int) and epoch >= 0 else None
    step = step if isinstance(step, int) and step >= 0 else None
    state_of_run = None
    if training and payload.get("optimizer") is not None:
        ours_of = dict(pairs)
        order = [ours_of[t] for t in their_parameter_order(theirs, wmap.aliases)]
        state_of_run = training_state(payload, cfg, model, order, wmap.head_order, source)
    return Imported(cfg, model.state_dict(), epoch, step, bn_form, state_of_run)


# ------------------------------------------------------------------------------------------ training state

BUFFER_LEAVES = ("running_mean", "running_var", "num_batches_tracked")  # every buffer their network has
SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def their_parameter_order(theirs: dict[str, torch.Tensor], aliases: dict[str, str]) -> list[str]:
    """Their keys in the order of their `model.parameters()`, which indexes their optimizer's state.

    A state dict lists, module by module in registration order, each module's parameters and then its
    buffers, and `parameters()` walks the same modules in the same order: so their parameters are the state
    dict's keys less the buffers (BN statistics) and less the `weight_normalized` aliases, which name a
    parameter already listed (`parameters()` gives each tensor once)."""
    return [k for k in theirs if k.rpartition(".")[2] not in BUFFER_LEAVES and k not in aliases]


def training_state(
    payload: dict[str, Any],
    cfg: NVAEConfig,
    model: torch.nn.Module,
    order: list[str],
    head_order: list[int] | None,
    source: str,
) -> dict[str, Any]:
    """Their run's state (`optimizer`, `grad_scalar`, `global_step`, `epoch`; what their `--cont_training`
    reads) as the entries of our resume checkpoint, for `model` (ours, built from `cfg`).

    `order[i]` is our name for their parameter i. Their optimizer is AdaMax (torch's or their fused one:
    the same `exp_avg`, `exp_inf` and `step` per parameter); each parameter's moments move to our
    parameter's index, checked against its shape, and an RGB head's are permuted as its weights are. Their
    learning-rate scheduler is not needed: our learning rate is a function of the step. CheckpointError
    naming the entry when the state does not fit the network."""
    opt = payload["optimizer"]
    where = f"{source}: optimizer"
    if (
        not isinstance(opt, dict)
        or not isinstance(opt.get("state"), dict)
        or not isinstance(opt.get("param_groups"), list)
    ):
        raise CheckpointError(f"{where} is not an optimizer state (no state and param_groups)")
    if len(opt["param_groups"]) != 1:
        raise CheckpointError(
            f"{where} has {len(opt['param_groups'])} parameter groups; the authors' train.py makes one"
        )
    group = opt["param_groups"][0]
    ids = group.get("params")
    if not isinstance(ids, list) or len(ids) != len(order):
        count = len(ids) if isinstance(ids, list) else "no"
        raise CheckpointError(
            f"{where} holds {count} parameters, the state_dict {len(order)}: they are of different networks"
        )
    expected = {"betas": [0.9, 0.999], "eps": cfg.adamax_eps, "weight_decay": cfg.weight_decay}
    for key, want in expected.items():
        got = group.get(key)
        if (list(got) if isinstance(got, tuple | list) else got) != want:
            raise CheckpointError(f"{where}: {key}={got!r}, the network's args give {want!r}")
    ours_index = {name: j for j, (name, _) in enumerate(model.named_parameters())}
    own = dict(model.named_parameters())
    state: dict[int, dict[str, torch.Tensor]] = {}
    for their_index, name in zip(ids, order, strict=True):
        entry = opt["state"].get(their_index)
        if entry is None:  # never stepped (no gradient yet): AdaMax starts it afresh, as theirs would
            continue
        if not isinstance(entry, dict) or not {"step", "exp_avg", "exp_inf"} <= set(entry):
            raise CheckpointError(f"{where}: parameter {their_index} ({name}) lacks step, exp_avg or exp_inf")
        moved: dict[str, torch.Tensor] = {}
        for key in ("exp_avg", "exp_inf"):
            tensor = entry[key]
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(own[name].shape):
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise CheckpointError(
                    f"{where}: {key} of parameter {their_index} is {shape}, its tensor ({name}) "
                    f"{tuple(own[name].shape)}"
                )
            if head_order is not None and name in HEAD_KEYS:
                tensor = tensor[head_order]
            moved[key] = tensor.detach().to(torch.float32).clone()
        step = entry["step"]
        moved["step"] = torch.tensor(float(step.item() if isinstance(step, torch.Tensor) else step))
        state[ours_index[name]] = moved
    lr = group.get("lr", cfg.lr)
    optimizer = {
        "state": state,
        "param_groups": [{"lr": float(lr), "betas": (0.9, 0.999), "eps": cfg.adamax_eps,
                          "weight_decay": cfg.weight_decay, "params": list(range(len(ours_index)))}],
    }  # fmt: skip
    scaler = payload.get("grad_scalar") or {}
    if scaler and (not isinstance(scaler, dict) or not set(SCALER_KEYS) <= set(scaler)):
        raise CheckpointError(
            f"{source}: grad_scalar is not a GradScaler state (needs {', '.join(SCALER_KEYS)})"
        )
    args = payload["args"]
    step = payload.get("global_step")
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"{source}: global_step={step!r}: a run's state needs its step count")
    out: dict[str, Any] = {
        "optimizer": optimizer,
        "scaler": dict(scaler),
        "step": step,
        "grad_accum": 1,
        "world_size": getattr(args, "num_proc_node", 1) * getattr(args, "num_process_per_node", 1),
        "skipped": 0,
        "nonfinite_in_row": 0,
    }
    if isinstance(payload.get("epoch"), int):
        out["epoch"] = payload["epoch"]
    total, epochs = getattr(args, "num_total_iter", None), getattr(args, "epochs", None)
    if isinstance(total, int) and isinstance(epochs, int) and epochs > 0:  # their len(train_queue) x epochs
        out["total_steps"], out["batches_per_epoch"] = total, total // epochs
    return out


def _plain_bn(key: str) -> str:
    head, _, leaf = key.rpartition(".bn.")
    return f"{head}.{leaf}"


def _with_exported_fields(cfg: NVAEConfig, extra: Any, source: str) -> NVAEConfig:
    """An exported file's own config for the fields its args do not carry; the rest must agree with args."""
    try:
        fields = json.loads(extra["config"])
        exported = NVAEConfig.from_dict(fields)
    except (TypeError, KeyError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{source}: {EXTRA_KEY} entry is not a config ({exc})") from None
    from_args = cfg.to_dict()
    carried = set(ARGS_TO_CONFIG.values()) | {f for f, _ in TRAINING_ARGS.values()} | {
        "dataset", "in_channels", "data_size", "image_size", "likelihood", "binarize", "recipe_processes"
    } | ({"num_mix", "num_bits"} if cfg.likelihood == "dmol" else set())  # fmt: skip
    for field in sorted(carried):
        if exported.to_dict()[field] != from_args[field]:
            raise CheckpointError(
                f"{source}: {EXTRA_KEY} config has {field}={exported.to_dict()[field]!r}, its args give "
                f"{from_args[field]!r}"
            )
    return exported


def export_nvlabs(cfg: NVAEConfig, state: dict[str, torch.Tensor], step: int = 0, epoch: int = 0) -> dict:
    """Our config and weights as an authors' checkpoint (what their `evaluate.py` reads), with our config and
    spectral vectors in the `nvae_pipeline` entry for an exact way back."""
    args = args_from_config(cfg)
    wmap = weight_map(cfg)
    theirs: dict[str, torch.Tensor] = {}
    inverse = None
    if wmap.head_order is not None:
        inverse = [0] * len(wmap.head_order)
        for ours_index, their_index in enumerate(wmap.head_order):
            inverse[their_index] = ours_index
    for t, o in wmap.pairs:
        tensor = state[o].detach()
        theirs[t] = (tensor[inverse] if inverse is not None and o in HEAD_KEYS else tensor).clone()
    for alias, weight in wmap.aliases.items():
        theirs[alias] = theirs[weight]  # the same tensor, as their module registers it
    return {
        "epoch": int(epoch),
        "global_step": int(step),
        "state_dict": theirs,
        "args": args,
        "arch_instance": {k: list(v) for k, v in RES_MBCONV.items()},
        EXTRA_KEY: {
            "config": cfg.to_json(),
            "tensors": {k: v.detach().clone() for k, v in state.items() if k.startswith("spectral.")},
        },
    }


# A checkpoint of ours less these (its envelope, config and weights) is the state that resumes its run.
ENVELOPE_KEYS = ("format", "version", "config", "model")


@dataclass
class StartingPoint:
    """What a run can start from: a config and weights, and the training state that continues the run that
    wrote them (None when the file holds weights only)."""

    config: NVAEConfig
    state: dict[str, torch.Tensor]
    training: dict[str, Any] | None


def starting_point(path: str | Path) -> StartingPoint:
    """The config, weights and training state of a checkpoint to start a run from: one of ours (a run's, or
    an import), or an authors' checkpoint (imported as `import_nvlabs` does). Read once, with weights_only;
    CheckpointError otherwise."""
    from model.checkpoint import check_envelope, check_model_entries, config_from_checkpoint

    payload = _safe_load(path)
    if isinstance(payload, dict) and "format" in payload:  # ours carries a format field, theirs does not
        check_envelope(payload, path)
        check_model_entries(payload, path)
        training = None
        if payload.get("optimizer") is not None:
            training = {k: v for k, v in payload.items() if k not in ENVELOPE_KEYS}
        return StartingPoint(config_from_checkpoint(payload), payload["model"], training)
    imported = import_nvlabs(_checked_nvlabs(payload, Path(path)), str(path))
    return StartingPoint(imported.config, imported.state, imported.training)
