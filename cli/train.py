"""`nvae info` and `nvae train`: a few lines each over the library."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from common.argtypes import int_in, positive_int
from model.config import PRESETS, build_config, get_preset, parse_set_args
from model.precision import PRECISIONS

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


# Exit codes of `nvae train`, chosen so a controller (Kubernetes Job podFailurePolicy, Kubeflow Trainer,
# torchrun's restarts) can tell what to retry: 1-2 are permanent (retrying repeats them), the rest retryable.
EXIT_OK = 0  # trained to the last step
EXIT_FAILED = 1  # training diverged: too many non-finite steps in a row, or ranks out of sync
EXIT_BAD_INPUT = 2  # bad flag, config, data or checkpoint (the `nvae` convention for library errors)
EXIT_STORAGE = 75  # checkpoint store unreachable, timing out, 5xx or throttling (EX_TEMPFAIL): retry later
EXIT_SIGINT = 130  # 128 + SIGINT, after writing a checkpoint: resume by running again
EXIT_SIGTERM = 143  # 128 + SIGTERM (preemption), after writing a checkpoint: resume by running again


def _train_error(msg: str, code: int) -> int:
    print(f"nvae train: error: {msg}", file=sys.stderr)
    return code


def cmd_train(args: argparse.Namespace) -> int:
    """Train one process, or one rank of a torchrun job (`--nproc N` launches torchrun itself)."""
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch_torchrun(args)

    from training.distributed import RankDivergenceError, init_distributed, shutdown
    from training.storage import StorageError
    from training.train import NonFiniteLossError, TrainingInterrupted

    ctx = init_distributed(args.device)
    try:
        summary = _train(args, ctx)
    except TrainingInterrupted as exc:
        if ctx.is_main:
            print(f"nvae train: {exc}; run the same command again to resume", file=sys.stderr)
        return 128 + exc.signum
    except (NonFiniteLossError, RankDivergenceError) as exc:
        return _train_error(str(exc), EXIT_FAILED)
    except StorageError as exc:
        return _train_error(str(exc), EXIT_STORAGE if exc.retryable else EXIT_BAD_INPUT)
    finally:
        shutdown(ctx)
    if ctx.is_main:
        log.info("training done: %s", json.dumps(summary))
        print(f"checkpoint: {summary['checkpoint']}")
    return EXIT_OK


def _train(args: argparse.Namespace, ctx) -> dict:
    from data.loaders import make_loader, read_manifest
    from training.train import TrainOptions, default_precision, train

    extra = {"batch_size": args.batch_size} if args.batch_size else {}
    cfg = _config(args, extra)
    manifest = read_manifest(args.data)
    if manifest.get("dataset") != cfg.dataset:
        raise ValueError(
            f"--data {args.data} holds {manifest.get('dataset')!r} but preset {args.preset} is for {cfg.dataset!r}"
        )

    def loader(epoch: int, start_batch: int = 0):
        return make_loader(
            args.data,
            "train",
            cfg.batch_size,
            train=True,
            seed=args.seed,
            epoch=epoch,
            start_batch=start_batch,
            rank=ctx.rank,
            world_size=ctx.world_size,
            binarize=cfg.binarize,
            flip=cfg.flip,
            device=str(ctx.device),
        )

    per_epoch = len(loader(0))
    if per_epoch == 0:
        raise ValueError(f"--data {args.data} has fewer than one batch of {cfg.batch_size} per process")
    if per_epoch < args.grad_accum:
        raise ValueError(
            f"--grad-accum {args.grad_accum} is more than the {per_epoch} batches of an epoch of --data {args.data}"
        )
    steps = args.steps or max(1, (args.epochs or cfg.epochs) * per_epoch // args.grad_accum)
    warn_global_batch(get_preset(args.preset), cfg.batch_size, ctx.world_size, args.grad_accum)
    opts = TrainOptions(
        steps=steps,
        batches_per_epoch=per_epoch,
        out=Path(args.out),
        precision=args.precision or default_precision(ctx.device),
        device=str(ctx.device),
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        checkpoint_dir=args.checkpoint_dir,
        log_every=args.log_every,
        max_nonfinite=args.max_nonfinite,
        eval_every=per_epoch if args.eval_every is None else args.eval_every,
        sample_count=args.samples,
        progress=not args.no_progress,
        dvclive=not args.no_dvclive,
        channels_last=args.channels_last,
        compile=args.compile,
        dist=ctx,
        grad_accum=args.grad_accum,
    )
    log.info(
        "%d steps of %d x %d images per process (%d batches per epoch), %s",
        steps,
        args.grad_accum,
        cfg.batch_size,
        per_epoch,
        opts.precision,
    )
    return train(cfg, loader, opts)


def warn_global_batch(recipe, batch_size: int, world_size: int, grad_accum: int) -> int:
    """Log a warning when the images per optimisation step differ from the recipe's global batch (`recipe`:
    the preset's config; its learning rate and schedules were tuned for that batch); returns the effective
    global batch."""
    effective = batch_size * world_size * grad_accum
    if effective != recipe.global_batch:
        hint = ""
        per_step = batch_size * world_size
        if recipe.global_batch % per_step == 0 and recipe.global_batch > per_step:
            hint = f"; --grad-accum {recipe.global_batch // per_step} reaches it"
        log.warning(
            "global batch %d (%d per process x %d processes x %d accumulated) differs from the recipe's %d "
            "(%d per GPU x %d GPUs)%s",
            effective,
            batch_size,
            world_size,
            grad_accum,
            recipe.global_batch,
            recipe.batch_size,
            recipe.recipe_processes,
            hint,
        )
    return effective


def _torchrun_argv(args: argparse.Namespace) -> list[str]:
    """The `nvae train` arguments for each torchrun worker (the same command without --nproc)."""
    argv = [
        "train",
        "--preset",
        args.preset,
        "--data",
        args.data,
        "--out",
        args.out,
        "--seed",
        str(args.seed),
    ]
    if args.config:
        argv += ["--config", args.config]
    for item in args.set:
        argv += ["--set", item]
    for flag, value in (
        ("--steps", args.steps),
        ("--epochs", args.epochs),
        ("--batch-size", args.batch_size),
        ("--grad-accum", args.grad_accum),
        ("--checkpoint-every", args.checkpoint_every),
        ("--checkpoint-dir", args.checkpoint_dir),
        ("--precision", args.precision),
        ("--device", args.device),
        ("--log-every", args.log_every),
        ("--max-nonfinite", args.max_nonfinite),
        ("--eval-every", args.eval_every),
        ("--samples", args.samples),
    ):
        if value is not None:
            argv += [flag, str(value)]
    if args.channels_last is not None:
        argv.append("--channels-last" if args.channels_last else "--no-channels-last")
    for flag, on in (
        ("--compile", args.compile),
        ("--no-progress", args.no_progress),
        ("--no-dvclive", args.no_dvclive),
    ):
        if on:
            argv.append(flag)
    return argv


def _launch_torchrun(args: argparse.Namespace) -> int:
    """Run `torchrun --standalone --nproc_per_node N -m cli.main train ...`; forward SIGTERM/SIGINT to it."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        "-m",
        "cli.main",
        *_torchrun_argv(args),
    ]
    log.info("launching: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        proc.send_signal(signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    # torchrun reports any failed worker as exit 1; after a forwarded signal the workers checkpointed.
    return 128 + received[0] if received else code


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
        "balancing, spectral/BN regularization). Re-running with the same --out resumes. Runs alone or "
        "under torchrun (batch size per process).",
        epilog="exit codes: 0 done; 1 training failed (non-finite steps, ranks out of sync); 2 bad input or "
        "a permanent failure (a flag, config, data or checkpoint; bad store credentials, a missing bucket, a "
        "checksum mismatch, a bad URI; a full disk); 75 checkpoint store unreachable, timing out, 5xx or "
        "throttling (retry later); 130/143 SIGINT/SIGTERM after a checkpoint (retry resumes). 1 and 2 "
        "repeat on a retry; 75, 130 and 143 do not.",
    )
    _add_config_args(p)
    p.add_argument("--data", required=True, help="directory written by `nvae prepare`")
    p.add_argument("--out", required=True, help="run directory (checkpoint.pt, metrics, dvclive/, samples/)")
    length = p.add_mutually_exclusive_group()
    length.add_argument(
        "--steps", type=positive_int("--steps"), help="optimisation steps (default: the preset's epochs)"
    )
    length.add_argument(
        "--epochs", type=positive_int("--epochs"), help="epochs instead of steps (default: the preset's)"
    )
    p.add_argument(
        "--batch-size",
        type=positive_int("--batch-size"),
        help="batch size per process (default: the preset's)",
    )
    p.add_argument(
        "--grad-accum",
        type=int_in("--grad-accum", 1, 1024),
        default=1,
        help="batches summed into each optimisation step (default 1). The recipes' global batch is the "
        "authors' per-GPU batch x their GPU count (`nvae info`): on N processes, --grad-accum "
        "recipe_processes/N reaches it. Caveat: BN statistics still come from each batch of --batch-size "
        "alone, so small batches differ from the authors' run even at the same global batch",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int_in("--checkpoint-every", 0),
        default=0,
        help="checkpoint every N steps (0: at the end)",
    )
    p.add_argument(
        "--checkpoint-dir",
        metavar="DIR|s3://BUCKET/PREFIX",
        help="where checkpoints go and resume from (default: --out); S3 endpoint and credentials come "
        "from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="fp32, bf16, or fp16 with GradScaler (CUDA). Default: fp16 on CUDA; bf16 on a CPU with AMX (or "
        "Arm BF16), where it is faster; else fp32 (AVX512-BF16 alone measured slower than fp32)",
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--nproc",
        type=positive_int("--nproc"),
        default=1,
        help="launch torchrun with N processes on this machine",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NHWC memory format for activations and weights (default: on for CPU, where a step is 1.4x "
        "faster; off on CUDA)",
    )
    p.add_argument(
        "--log-every", type=positive_int("--log-every"), default=1, help="steps between logged metrics"
    )
    p.add_argument(
        "--eval-every",
        type=int_in("--eval-every", 0),
        help="steps between latent statistics and sample grids (default: an epoch)",
    )
    p.add_argument(
        "--samples", type=int_in("--samples", 0), default=16, help="images in each sample grid (0: none)"
    )
    p.add_argument(
        "--max-nonfinite",
        type=positive_int("--max-nonfinite"),
        default=10,
        help="stop after N non-finite steps in a row",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-dvclive", action="store_true", help="metrics to train_metrics.jsonl only")
    p.set_defaults(func=cmd_train)
