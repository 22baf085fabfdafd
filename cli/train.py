"""`nvae info` and `nvae train`: a few lines each over the library."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from common.argtypes import int_in, positive_int
from common.errors import NVAEError, StorageError
from model.config import PRESETS, build_config, parse_set_args
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
    from data.loaders import unverified
    from training.distributed import is_main_process
    from training.run import launch_torchrun, run_training

    with unverified(args.no_verify):  # in this process and the ranks it starts
        if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
            return launch_torchrun(_worker_argv(args), args.nproc)
        try:
            summary = run_training(_request(args))
        except NVAEError as exc:
            return _exit_status(exc)
    if is_main_process():
        log.info("training done: %s", json.dumps(summary))
        print(f"checkpoint: {summary['checkpoint']}")
    return EXIT_OK


def _exit_status(exc: NVAEError) -> int:
    """The exit status of a run stopped by `exc` (see EXIT_*), after its line on stderr; any other product
    error is raised again, for `nvae`'s own handler (exit 2)."""
    from training.distributed import RankDivergenceError, is_main_process
    from training.train import NonFiniteLossError, TrainingInterrupted

    if isinstance(exc, TrainingInterrupted):
        if is_main_process():
            print(f"nvae train: {exc}; run the same command again to resume", file=sys.stderr)
        return 128 + exc.signum
    if isinstance(exc, NonFiniteLossError | RankDivergenceError):
        return _train_error(str(exc), EXIT_FAILED)
    if isinstance(exc, StorageError):
        return _train_error(str(exc), EXIT_STORAGE if exc.retryable else EXIT_BAD_INPUT)
    raise exc


def _request(args: argparse.Namespace):
    """The run `args` ask for, as the library's `TrainRequest`."""
    from training.run import TrainRequest

    return TrainRequest(
        data=args.data,
        out=args.out,
        init_from=args.init_from or None,
        continue_from=args.continue_from or None,
        preset=args.preset,
        config_file=args.config,
        overrides=parse_set_args(args.set),
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        seed=args.seed,
        precision=args.precision,
        device=args.device,
        checkpoint_every=args.checkpoint_every,
        checkpoint_dir=args.checkpoint_dir,
        log_every=args.log_every,
        eval_every=args.eval_every,
        samples=args.samples,
        max_nonfinite=args.max_nonfinite,
        progress=not args.no_progress,
        dvclive=not args.no_dvclive,
        channels_last=args.channels_last,
        compile=args.compile,
    )


def _worker_argv(args: argparse.Namespace) -> list[str]:
    """The `nvae train` arguments that give each torchrun worker these `args`, less the launcher's --nproc.
    Read off the parser's own actions (each value that differs from its default), so no flag is listed twice."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_train_args(parser)
    argv: list[str] = []
    for action in parser._actions:
        value = getattr(args, action.dest)
        if action.dest == "nproc" or value == action.default:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):  # --channels-last / --no-channels-last
            argv.append(flag if value else action.option_strings[1])
        elif action.nargs == 0:  # store_true
            argv.append(flag)
        elif isinstance(value, list):  # append: --set KEY=VALUE, repeated
            argv += [arg for item in value for arg in (flag, str(item))]
        else:
            argv += [flag, str(value)]
    return argv


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
    _add_train_args(p)
    p.set_defaults(func=cmd_train, locks_own_run=True)  # training.train holds --out's lock


def _add_train_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--data", required=True, help="directory written by `nvae prepare`")
    p.add_argument("--out", required=True, help="run directory (checkpoint.pt, metrics, dvclive/, samples/)")
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="read the prepared splits without checking them against the manifest's SHA-256 (checked by "
        "default, once per file version: a restart does not hash again)",
    )
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--init-from",
        metavar="CKPT",
        help="start from this checkpoint's network, config and weights (one of ours, or an authors' NVlabs/NVAE "
        "checkpoint, such as their released models) instead of a fresh network; --preset is then unused and "
        "--config/--set apply over its config. The optimizer and step start afresh. A checkpoint of the run "
        "itself in --out, when there is one, still wins: running again resumes. Empty: none",
    )
    start.add_argument(
        "--continue-from",
        metavar="CKPT",
        help="continue the run that wrote this checkpoint, in --out: its network, config and weights as with "
        "--init-from, and its optimizer moments, loss scale and step, so the schedules go on where it stopped. "
        "CKPT is one of ours (a run's, or `nvae import-nvlabs` of a file with its optimizer) or an authors' "
        "checkpoint.pt with its optimizer (what their --cont_training reads). A checkpoint of the run itself "
        "in --out still wins. Empty: none",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument(
        "--steps",
        type=int_in("--steps", 0),
        help="optimisation steps (default: the preset's epochs); 0, with --init-from: train nothing, only "
        "evaluate and sample the starting model and write the run's files",
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
