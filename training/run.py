"""One training run as `nvae train` asks for it, and the torchrun launcher that runs it on N processes.

`run_training` turns a `TrainRequest` (a preset and its overrides, a prepared data directory, a run
directory, how long and how to train) into the loop's inputs: the config, this rank's loader, the step count
and the `TrainOptions`; then it trains and returns the run's summary. It checks that the data fits the
request before the first step, and says so when the global batch differs from the recipe's.

`launch_torchrun` starts `nvae train` again as the workers of a one-machine torchrun job; each worker calls
`run_training` as one rank. The program torchrun runs is the plain `nvae train` command (`python -m cli
train`), so any other launcher (a Kubeflow TrainJob, a hand-written torchrun line) runs the same thing.

Imports only the standard library and `common` at module level: the modules that need torch are imported
when a run starts.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainRequest:
    """What one `nvae train` run asks for (its flags, typed); `None` takes the default named beside it."""

    data: str  # directory written by `nvae prepare`
    out: str  # run directory: checkpoint, metrics, DVCLive, sample grids
    init_from: str | None = (
        None  # a checkpoint (ours or the authors') to start from instead of a fresh network
    )
    # A checkpoint (ours or the authors', with its optimizer) whose run this one continues: weights,
    # optimizer moments, loss scale and step. Excludes `init_from`.
    continue_from: str | None = None
    preset: str = "fmnist-cpu"
    config_file: str | None = None  # YAML mapping of config fields over the preset
    overrides: dict[str, Any] = field(default_factory=dict)  # config fields over the preset and the file
    steps: int | None = None  # None: `epochs` of optimisation steps
    epochs: int | None = None  # None: the config's
    batch_size: int | None = None  # per process; None: the config's
    grad_accum: int = 1  # batches summed into each optimisation step
    seed: int = 0
    precision: str | None = None  # None: `default_precision` of the device
    device: str | None = None  # "cpu", "cuda[:N]"; None: CUDA when available
    checkpoint_every: int = 0  # 0: at the end (and on SIGTERM/SIGINT)
    checkpoint_dir: str | None = None  # local directory or s3://bucket/prefix; None: `out`
    log_every: int = 1
    eval_every: int | None = None  # steps between latent statistics and sample grids; None: an epoch
    samples: int = 16  # images in each sample grid
    max_nonfinite: int = 10
    progress: bool = True
    dvclive: bool = True
    channels_last: bool | None = None  # None: on for CPU, off on CUDA
    compile: bool = False


def run_training(request: TrainRequest) -> dict[str, Any]:
    """Train as `request` asks, alone or as this process's rank of a torchrun job, resuming from the run's
    checkpoint when there is one; returns the run's summary (what `train_summary.json` holds).

    Raises DataError or ConfigError when the data does not fit the request, and whatever `train` raises
    (NonFiniteLossError, TrainingInterrupted, StorageError, RankDivergenceError).
    """
    from training.distributed import init_distributed, shutdown

    ctx = init_distributed(request.device)
    try:
        return _train(request, ctx)
    finally:
        shutdown(ctx)


def _train(request: TrainRequest, ctx) -> dict[str, Any]:
    from data import loaders
    from model.config import build_config, get_preset
    from training import train as loop

    overrides = dict(request.overrides)
    if request.batch_size:
        overrides["batch_size"] = request.batch_size
    init_state = continue_state = None
    if request.init_from and request.continue_from:
        raise ConfigError(
            "--init-from and --continue-from exclude each other: start anew or continue, not both"
        )
    if request.init_from:
        cfg, init_state, _ = _starting_point(request.init_from, request.config_file, overrides)
        source = f"--init-from {request.init_from}"
    elif request.continue_from:
        cfg, init_state, continue_state = _starting_point(
            request.continue_from, request.config_file, overrides
        )
        source = f"--continue-from {request.continue_from}"
        if continue_state is None:
            raise ConfigError(
                f"{source}: the file holds weights only (no optimizer state) and there is no run to continue; "
                "--init-from starts a new run from its weights"
            )
    else:
        cfg = build_config(request.preset, request.config_file, overrides)
        source = f"preset {request.preset}"
    if request.steps == 0 and init_state is None:
        raise ConfigError("--steps 0 trains nothing: it needs --init-from, the model to evaluate and pass on")
    manifest = loaders.read_manifest(request.data)
    if manifest.get("dataset") != cfg.dataset:
        raise DataError(
            f"--data {request.data} holds {manifest.get('dataset')!r} but {source} is for {cfg.dataset!r}"
        )

    def loader(epoch: int, start_batch: int = 0):
        return loaders.make_loader(
            request.data,
            "train",
            cfg.batch_size,
            train=True,
            seed=request.seed,
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
        raise ConfigError(f"--data {request.data} has fewer than one batch of {cfg.batch_size} per process")
    if per_epoch < request.grad_accum:
        raise ConfigError(
            f"--grad-accum {request.grad_accum} is more than the {per_epoch} batches of an epoch of --data "
            f"{request.data}"
        )
    steps = request.steps
    if steps is None:
        steps = max(1, (request.epochs or cfg.epochs) * per_epoch // request.grad_accum)
    if init_state is None:
        warn_global_batch(get_preset(request.preset), cfg.batch_size, ctx.world_size, request.grad_accum)
    opts = loop.TrainOptions(
        steps=steps,
        batches_per_epoch=per_epoch,
        out=Path(request.out),
        precision=request.precision or loop.default_precision(ctx.device),
        device=str(ctx.device),
        seed=request.seed,
        checkpoint_every=request.checkpoint_every,
        checkpoint_dir=request.checkpoint_dir,
        log_every=request.log_every,
        max_nonfinite=request.max_nonfinite,
        eval_every=per_epoch if request.eval_every is None else request.eval_every,
        sample_count=request.samples,
        progress=request.progress,
        dvclive=request.dvclive,
        channels_last=request.channels_last,
        compile=request.compile,
        dist=ctx,
        grad_accum=request.grad_accum,
        init_state=init_state,
        continue_state=continue_state,
    )
    log.info(
        "%d steps of %d x %d images per process (%d batches per epoch), %s",
        steps,
        request.grad_accum,
        cfg.batch_size,
        per_epoch,
        opts.precision,
    )
    return loop.train(cfg, loader, opts)


def _starting_point(path: str, config_file: str | None, overrides: dict[str, Any]):
    """The config, weights and training state (or None) of `--init-from`/`--continue-from` (ours or an
    authors' checkpoint), with the config file's fields and then `--set`'s over its config."""
    from model.config import apply_overrides, load_yaml_overrides
    from model.nvlabs import starting_point

    start = starting_point(path)
    cfg = start.config
    if config_file:
        cfg = apply_overrides(cfg, load_yaml_overrides(config_file), source=str(config_file))
    log.info("starting from %s (%s); --preset is not used", path, cfg.dataset)
    return apply_overrides(cfg, overrides).validate(), start.state, start.training


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


# ------------------------------------------------------------------------------------------ launching


def launch_torchrun(train_argv: list[str], nproc: int) -> int:
    """Run `nvae train TRAIN_ARGV` as `nproc` torchrun workers on this machine (`--standalone`), passing
    SIGTERM/SIGINT on to torchrun, which passes them to the workers; they checkpoint and stop.

    Returns torchrun's exit status (1 when any worker failed, whatever its own status was), or 128 + the signal
    after a forwarded one (the workers checkpointed: running the command again resumes).
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "cli",
        "train",
        *train_argv,
    ]
    log.info("launching: %s", " ".join(cmd))
    code, forwarded = run_forwarding_signals(cmd)
    return 128 + forwarded if forwarded else code


def run_forwarding_signals(cmd: list[str]) -> tuple[int, int | None]:
    """Run `cmd` to its end, its output going where this process's goes, and pass SIGTERM and SIGINT on to it
    while it runs (a preempted parent lets its child checkpoint); returns (its exit status, the first signal
    passed on or None). Off the main thread, where Python cannot take signals, it only waits.

    On Linux the child is killed when this process dies (a SIGKILL, an OOM kill), as a command run in-process
    would be, so no orphan goes on training and writing checkpoints under a retry."""
    import threading

    proc = subprocess.Popen(cmd, preexec_fn=_die_with_parent())
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        proc.send_signal(signum)

    old = {}
    if threading.current_thread() is threading.main_thread():
        old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return code, received[0] if received else None


def _die_with_parent():
    """A `preexec_fn` asking Linux to SIGKILL the child when its parent dies (PR_SET_PDEATHSIG); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGKILL)


__all__ = ["TrainRequest", "launch_torchrun", "run_forwarding_signals", "run_training", "warn_global_batch"]
