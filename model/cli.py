"""`nvae info` and `nvae train`: a few lines each over the library."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from model.config import PRESETS, build_config, parse_set_args
from model.runtime import PRECISIONS

log = logging.getLogger(__name__)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset", default="fmnist-cpu", choices=list(PRESETS), help="released recipe or small preset"
    )
    p.add_argument(
        "--config", metavar="FILE.yaml", help="YAML mapping of config fields overriding the preset"
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="override one config field (repeatable), e.g. --set channels=32",
    )


def _config(args: argparse.Namespace, extra: dict | None = None):
    overrides = parse_set_args(args.set)
    overrides.update(extra or {})
    return build_config(args.preset, args.config, overrides)


def cmd_info(args: argparse.Namespace) -> int:
    from model.info import format_info, model_info

    info = model_info(_config(args), args.preset)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from data.loaders import make_loader, read_manifest
    from model.train import TrainOptions, train

    extra = {"batch_size": args.batch_size} if args.batch_size else {}
    cfg = _config(args, extra)
    manifest = read_manifest(args.data)
    if manifest.get("dataset") != cfg.dataset:
        raise ValueError(
            f"--data {args.data} holds {manifest.get('dataset')!r} but preset {args.preset} is for {cfg.dataset!r}"
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    first = make_loader(
        args.data,
        "train",
        cfg.batch_size,
        train=True,
        seed=args.seed,
        epoch=0,
        binarize=cfg.binarize,
        flip=cfg.flip,
    )
    per_epoch = len(first)
    steps = args.steps or cfg.epochs * per_epoch

    def batches(epoch: int, start_batch: int):
        return make_loader(
            args.data,
            "train",
            cfg.batch_size,
            train=True,
            seed=args.seed,
            epoch=epoch,
            start_batch=start_batch,
            binarize=cfg.binarize,
            flip=cfg.flip,
        )

    precision = args.precision or "fp32"
    opts = TrainOptions(
        steps=steps,
        batches_per_epoch=per_epoch,
        out=Path(args.out),
        precision=precision,
        device=device,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    summary = train(cfg, batches, opts)
    log.info("training done: %s", json.dumps(summary))
    print(f"checkpoint: {Path(args.out) / 'checkpoint.pt'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="parameter count, layers, latent layout and GFLOP of a preset",
        description="Describe a preset's network: parameters, conv/BN layers, groups per scale, "
        "latent shape per group and forward GFLOP per image.",
    )
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "train",
        help="train NVAE on a prepared dataset (resumes from --out)",
        description="Train with the released recipe (AdaMax, warm-up + cosine lr, KL warm-up and "
        "balancing, spectral/BN regularization). Re-running with the same --out resumes.",
    )
    _add_config_args(p)
    p.add_argument("--data", required=True, help="directory written by `nvae prepare`")
    p.add_argument("--out", required=True, help="run directory (checkpoint.pt, metrics)")
    p.add_argument("--steps", type=int, help="optimisation steps (default: the preset's epochs)")
    p.add_argument("--batch-size", type=int, help="batch size per process (default: the preset's)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=PRECISIONS, help="fp32 (default), bf16, or fp16 (CUDA)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.set_defaults(func=cmd_train)
