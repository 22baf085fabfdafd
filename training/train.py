"""The training loop of the released recipe, alone or as one rank of a torchrun job.

AdaMax, lr linear warm-up + cosine, KL warm-up and balancing (in iterations), spectral and BN regularization,
autocast (fp32 / bf16 / fp16 with GradScaler), checkpoints that resume exactly, live metrics.

The data source is a callable `batches(epoch, start_batch)` yielding float tensors (B, C, D, D) in [0, 1] for
this rank, so this module knows nothing of files or formats.

Exact resume: a checkpoint holds the model (with the power-iteration vectors and BN statistics as buffers),
optimizer, scaler, the step (which fixes epoch, position in the epoch and both schedules) and every rank's
RNG states. The data order is a pure function of (seed, epoch, rank), and fetching a batch never touches the
global RNG (it runs inside `fork_rng`), so the only random stream the steps consume is the one checkpointed.

Under DDP the whole objective (forward, reconstruction, KL, spectral and BN terms) runs inside one wrapper
module's forward, so one backward yields every gradient and DDP all-reduces each once. Power-iteration
vectors are buffers computed from the (identical) weights and broadcast from rank 0 with the other buffers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.cpu import cpu_flags
from common.errors import DataError, NVAEError
from common.files import FolderLock, atomic_write_json
from common.progress import progress as progress_bar
from model.checkpoint import FORMAT, VERSION, config_from_checkpoint
from model.config import NVAEConfig
from model.network import NVAE
from model.objective import LossTerms, kl_balance_alphas, nvae_loss
from model.precision import autocast, configure_cpu
from training.distributed import (
    DistContext,
    any_flags,
    barrier,
    check_in_sync,
    convert_sync_batchnorm,
    gather_objects,
    mean_over_ranks,
)
from training.metrics import RunLogger, latent_stats
from training.storage import CheckpointStore, open_store

log = logging.getLogger(__name__)

BatchSource = Callable[[int, int], Iterable[torch.Tensor]]


class NonFiniteLossError(NVAEError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class TrainingInterrupted(NVAEError):
    """SIGTERM or SIGINT arrived; a checkpoint of the last finished step was written first."""

    def __init__(self, signum: int, step: int, location: str):
        self.signum, self.step, self.location = signum, step, location
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: checkpoint of step {step} written to {location}")


@dataclass
class TrainOptions:
    steps: int  # optimisation steps in total
    batches_per_epoch: int  # batches of `batch_size` per process per epoch
    out: Path  # run directory: metrics, DVCLive, samples (and checkpoints unless `checkpoint_dir`)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (see `default_precision`)
    device: str = "cpu"  # ignored when `dist` is given (its device wins)
    seed: int = 0
    checkpoint_every: int = 0  # 0: only at the end (and on SIGTERM)
    log_every: int = 10
    max_nonfinite: int = 10  # consecutive non-finite steps before giving up
    progress: bool = True
    checkpoint_dir: str | None = None  # local directory or s3://bucket/prefix; default `out`
    eval_every: int = 0  # steps between latent statistics + sample grids; 0: at the end only
    sample_count: int = 16
    sample_temperature: float = 1.0
    dvclive: bool = True
    channels_last: bool | None = (
        None  # None: on for CPU (oneDNN's NHWC kernels are faster there), off on CUDA
    )
    compile: bool = False
    handle_signals: bool = True  # checkpoint and stop on SIGTERM/SIGINT (main thread only)
    dist: DistContext | None = None
    # Batches whose gradients are summed into one optimisation step: with N processes the step sees
    # grad_accum x N x batch_size images (reach the recipe's global batch on fewer GPUs). BN statistics still
    # come from each batch alone, and the spectral regularizer's power iteration advances once per batch.
    grad_accum: int = 1
    # Weights to start from instead of the fresh network (`nvae train --init-from`); a checkpoint of the run
    # itself in the store still wins (resume). With steps == 0 the run only evaluates and samples them.
    init_state: dict[str, torch.Tensor] | None = None
    # With `init_state`, the training state that continues the run that wrote it (`nvae train
    # --continue-from`): the entries of a resume checkpoint (optimizer, scaler, step, ...), taken as if the
    # store held it. A checkpoint of the run itself in the store still wins.
    continue_state: dict[str, Any] | None = None

    @property
    def start_flag(self) -> str:
        """How messages name where `init_state` came from."""
        return "--init-from" if self.continue_state is None else "--continue-from"

    @property
    def steps_per_epoch(self) -> float:
        return self.batches_per_epoch / self.grad_accum


# ------------------------------------------------------------------------------------------ recipe


def learning_rate(cfg: NVAEConfig, step: int, total_steps: int, batches_per_epoch: int) -> float:
    """Linear warm-up over `warmup_epochs`, then cosine from `lr` to `lr_min` at the last step."""
    warmup = int(cfg.warmup_epochs * batches_per_epoch)
    warmup = min(warmup, max(total_steps - 1, 0))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    span = max(total_steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * progress))


def make_optimizer(cfg: NVAEConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adamax(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=cfg.adamax_eps, weight_decay=cfg.weight_decay
    )


def cpu_bf16_is_faster(cpuinfo: str | None = None) -> bool:
    """Whether bf16 autocast beats fp32 for training on this CPU, from /proc/cpuinfo: with AMX tiles on x86 (or
    BF16 on Arm). Not without native bf16, where oneDNN emulates it and fp32 is faster, and not with
    AVX512-BF16 alone, where fp32 is faster too (the figures are in bench/RESULTS.md)."""
    return bool(cpu_flags(cpuinfo) & {"amx_bf16", "bf16"})


def default_precision(device: torch.device | str) -> str:
    """The recipe's fp16 on CUDA; bf16 on a CPU where it is faster than fp32 (`cpu_bf16_is_faster`); fp32
    otherwise."""
    kind = torch.device(device).type
    if kind == "cuda":
        return "fp16"
    return "bf16" if kind == "cpu" and cpu_bf16_is_faster() else "fp32"


# ------------------------------------------------------------------------------------------ objective


class Objective(nn.Module):
    """The whole training loss as one module, so DDP sees every gradient in one backward.

    forward(x (B, C, D, D), step, total_steps) -> LossTerms; the latest mean KL per latent channel,
    (G, Z), is kept in `kl_diag` for the per-interval statistics.
    """

    def __init__(self, model: NVAE):
        super().__init__()
        self.model = model
        self.register_buffer("alphas", kl_balance_alphas(model.cfg.groups_per_scale), persistent=False)
        self.kl_diag: torch.Tensor | None = None
        model.register_forward_hook(self._keep_kl_diag)

    def _keep_kl_diag(self, module, inputs, out) -> None:
        self.kl_diag = torch.stack([k.detach().float() for k in out.kl_diag])

    def forward(self, x: torch.Tensor, step: int, total_steps: int) -> LossTerms:
        return nvae_loss(self.model, x, step, total_steps, self.alphas)


# ------------------------------------------------------------------------------------------ state


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _rng_guard(device: torch.device):
    """Run a block without consuming the global RNG (a DataLoader iterator draws its base seed from it)."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


class _StopSignals:
    """Turns SIGTERM/SIGINT into a flag the loop checks once per step; restores the old handlers on exit."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is None:
            log.warning(
                "%s received: stopping after this step with a checkpoint", signal.Signals(signum).name
            )
        self.signum = signum

    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> _StopSignals:
        if self.enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------------------------ one step


@dataclass
class StepResult:
    """What one optimisation step did."""

    terms: LossTerms  # the loss terms of its last batch
    grad_norm: torch.Tensor  # the gradients' total norm, unscaled, before the update
    applied: bool  # every rank's loss and gradients were finite, so the optimizer stepped
    stop: bool  # some rank was asked to stop (its `stop_requested()`)
    images: int  # images this process took: the batches' sizes summed


def training_step(
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batches: Iterator[torch.Tensor],
    step: int,
    total_steps: int,
    lr: float,
    *,
    precision: str = "fp32",
    grad_accum: int = 1,
    channels_last: bool = False,
    dist: DistContext | None = None,
    stop_requested: Callable[[], bool] | None = None,
) -> StepResult:
    """One optimisation step: `grad_accum` batches (B, C, D, D) from `batches` through `net` (an `Objective`,
    or DDP around one) under autocast, backward through `scaler`, the gradient norm, then the optimizer at `lr`.

    Each loss is divided by `grad_accum`, so the summed gradient is the batches' mean. When any rank's loss or
    gradient is non-finite, no rank updates (the gradients are dropped). The flags every rank must agree on,
    non-finite and `stop_requested()` (asked after the backward: a signal that came during the step counts), are
    reduced over `dist`'s ranks together, in one all-reduce.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    device = params[0].device
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    ddp = isinstance(net, nn.parallel.DistributedDataParallel)
    images, loss_finite = 0, True
    for micro in range(grad_accum):
        x = next(batches).to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        images += x.size(0)
        # DDP all-reduces the gradients once, on the last batch of the step
        sync = net.no_sync() if ddp and micro < grad_accum - 1 else contextlib.nullcontext()
        with sync:
            with autocast(device, precision):
                terms = net(x, step, total_steps)
            loss_finite = loss_finite and bool(torch.isfinite(terms.loss))
            loss = terms.loss / grad_accum if grad_accum > 1 else terms.loss
            scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
    finite = loss_finite and bool(torch.isfinite(grad_norm))
    flags = [not finite, bool(stop_requested and stop_requested())]
    bad, stop = any_flags(dist, *flags) if dist is not None else flags
    if bad:
        optimizer.zero_grad(set_to_none=True)
    else:
        scaler.step(optimizer)
    scaler.update()
    return StepResult(terms, grad_norm, not bad, stop, images)


# ------------------------------------------------------------------------------------------ the loop


@dataclass
class _Run:
    """One training run's live objects and counters, shared by its phases."""

    cfg: NVAEConfig
    opts: TrainOptions
    ctx: DistContext
    model: NVAE
    objective: Objective
    net: nn.Module  # the objective, or DDP around it
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    store: CheckpointStore
    logger: RunLogger
    channels_last: bool
    step: int = 0  # optimisation steps done
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    nonfinite_in_row: int = 0
    saved_step: int = -1  # the step of the newest checkpoint in the store (-1: none)


@dataclass
class _Meter:
    """What the loop sums between log lines (images, for img/s) and between evaluations (KL per latent)."""

    t_log: float
    images: int = 0  # over all ranks
    kl_sum: torch.Tensor | None = None
    kl_steps: int = 0
    last: dict[str, Any] = field(default_factory=dict)  # the metrics of the last log line


def train(cfg: NVAEConfig, batches: BatchSource, opts: TrainOptions) -> dict[str, Any]:
    """Train (or resume from the checkpoint store) for `opts.steps` steps; returns a summary of the run.

    Raises NonFiniteLossError after `max_nonfinite` non-finite steps in a row (the last good checkpoint is
    kept), TrainingInterrupted after checkpointing on SIGTERM/SIGINT.
    """
    is_main = opts.dist is None or opts.dist.is_main
    # One writer per run folder: the main rank holds its lock for the whole run (the OS drops it if we die).
    with FolderLock(opts.out, "nvae train") if is_main else contextlib.nullcontext():
        run = _set_up(cfg, opts)
        last = _loop(run, batches)
        if opts.steps == 0 and run.step == 0:  # nothing to train: the starting model's statistics and samples
            _evaluate_untrained(run, batches)
        return _finish(run, last)


def _load_starting_weights(model: NVAE, state: dict[str, torch.Tensor], flag: str = "--init-from") -> None:
    """`--init-from`'s (or `--continue-from`'s) weights into the live network; a config override that
    changed its shapes is named."""
    own = model.state_dict()
    for key, tensor in state.items():
        if key in own and own[key].shape != tensor.shape:
            raise NVAEError(
                f"{flag}: {key} is {tuple(tensor.shape)} there and {tuple(own[key].shape)} in this "
                "config; --set only fields that keep the network's shapes"
            )
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise NVAEError(f"{flag}: the weights do not fit the network ({(missing or unexpected)[0]})")
    model.load_state_dict(state)


def _evaluate_untrained(run: _Run, batches: BatchSource) -> None:
    """For a run of 0 steps: the latent statistics of one training batch through the starting model (eval
    mode, no gradients) and a sample grid, logged as a last interval would be."""
    x = next(_without_rng(_batch_stream(batches, 0, run.opts), run.ctx.device))
    run.model.eval()
    with torch.no_grad(), _rng_guard(run.ctx.device):
        out = run.model(x.to(run.ctx.device))
    run.model.train()
    kl_diag = torch.stack([k.float() for k in out.kl_diag])
    _evaluate_interval(run.model, run.ctx, run.logger, run.opts, 0, kl_diag)


def _set_up(cfg: NVAEConfig, opts: TrainOptions) -> _Run:
    """The network (the same initial weights on every rank), optimizer, scaler and checkpoint store, resumed
    from the store's newest checkpoint when it holds one; then the objective (under DDP across ranks) and the
    metrics logger."""
    ctx = opts.dist or DistContext(device=torch.device(opts.device))
    device = ctx.device
    if device.type == "cpu":
        configure_cpu()
    autocast(device, opts.precision)  # validates precision against the device early
    opts.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(opts.seed)  # identical initial weights on every rank
    model = NVAE(cfg)
    if ctx.distributed and device.type == "cuda":
        model = convert_sync_batchnorm(model)
    model = model.to(device)
    channels_last = opts.channels_last if opts.channels_last is not None else device.type == "cpu"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, init_scale=1024.0, enabled=opts.precision == "fp16")
    if ctx.rank:  # every rank draws its own posterior noise
        torch.manual_seed(opts.seed + 100_003 * ctx.rank)

    store = open_store(opts.checkpoint_dir or opts.out)
    step = skipped = nonfinite_in_row = 0
    payload = store.load_latest(device)
    from_store = payload is not None
    if payload is not None:
        step, skipped, nonfinite_in_row = _resume(payload, cfg, model, optimizer, scaler, ctx, opts)
        log.info("resumed from %s at step %d", store.location, step)
    elif opts.init_state is not None:
        _load_starting_weights(model, opts.init_state, opts.start_flag)
        if opts.continue_state is not None:  # the weights fit this config: continue their run in it
            accum = opts.continue_state.get("grad_accum")
            if (
                accum is not None and int(accum) != opts.grad_accum
            ):  # a new run folder: no data position to keep
                log.warning("%s was written summing %s batch(es) per step, this run sums %d (--grad-accum): "
                            "the step count goes on as it is", opts.start_flag, accum, opts.grad_accum)  # fmt: skip
            payload = {**opts.continue_state, "model": opts.init_state, "config": cfg.to_json(),
                       "grad_accum": opts.grad_accum}  # fmt: skip
            step, skipped, nonfinite_in_row = _resume(payload, cfg, model, optimizer, scaler, ctx, opts)
            log.info("continuing the run of %s at step %d", opts.start_flag, step)

    objective = Objective(model)
    if opts.compile:
        model.compile()
    net: nn.Module = objective
    if ctx.distributed:
        # Buffers (BN statistics, power-iteration vectors) are synced from rank 0 at every forward (the
        # default), so ranks never drift apart even where floating-point reductions differ.
        net = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device] if device.type == "cuda" else None
        )
    if from_store and ctx.is_main:  # before DVCLive reopens its files
        dropped = RunLogger(opts.out, enabled=True, resume=True, dvclive=False).truncate_after(step)
        if dropped:
            log.info(
                "dropped %d metric lines logged after step %d, the checkpoint resumed from", dropped, step
            )
    logger = RunLogger(opts.out, enabled=ctx.is_main, resume=from_store, dvclive=opts.dvclive)
    return _Run(
        cfg, opts, ctx, model, objective, net, optimizer, scaler, store, logger, channels_last,
        step=step, skipped=skipped, nonfinite_in_row=nonfinite_in_row,
        saved_step=step if from_store else -1,
    )  # fmt: skip


def _loop(run: _Run, batches: BatchSource) -> dict[str, Any]:
    """Optimisation steps from `run.step` to the last: each `training_step`, then its metrics, evaluation and
    checkpoint when due; stops with a checkpoint on SIGTERM/SIGINT. Returns the last logged metrics."""
    opts, ctx = run.opts, run.ctx
    run.model.train()
    bar = progress_bar(
        total=opts.steps,
        initial=run.step,
        disable=not (opts.progress and ctx.is_main),
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    meter = _Meter(t_log=time.perf_counter())
    stream = _without_rng(_batch_stream(batches, run.step, opts), ctx.device)
    with _StopSignals(opts.handle_signals) as stop:
        while run.step < opts.steps:
            lr = learning_rate(run.cfg, run.step, opts.steps, opts.steps_per_epoch)
            result = training_step(
                run.net,
                run.optimizer,
                run.scaler,
                stream,
                run.step,
                opts.steps,
                lr,
                precision=opts.precision,
                grad_accum=opts.grad_accum,
                channels_last=run.channels_last,
                dist=ctx,
                stop_requested=stop.requested,
            )
            if result.applied:
                run.nonfinite_in_row = 0
                run.step += 1
                bar.update(1)
                _record(run, meter, result, lr, bar)
            else:
                _count_skipped(run, bar)
            if opts.checkpoint_every and run.step % opts.checkpoint_every == 0:
                _checkpoint(run)
            if result.stop:
                bar.close()
                location = _checkpoint(run)
                run.logger.close()
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, run.step, location)
    bar.close()
    return meter.last


def _batch_stream(batches: BatchSource, first_step: int, opts: TrainOptions) -> Iterator[torch.Tensor]:
    """The training batches from the position of `first_step`, across epochs (each epoch its own shuffle, as
    a fresh run would see it)."""
    position = first_step * opts.grad_accum
    while True:
        epoch, start_batch = divmod(position, opts.batches_per_epoch)
        produced = False
        for x in batches(epoch, start_batch):
            produced = True
            position += 1
            yield x
        if not produced:
            raise DataError(f"the data source yielded no batch for epoch {epoch} from batch {start_batch}")


def _without_rng(stream: Iterator[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """`stream`'s items, each fetched without consuming the global RNG (see `_rng_guard`)."""
    while True:
        with _rng_guard(device):
            x = next(stream)
        yield x


def _count_skipped(run: _Run, bar) -> None:
    """Count a skipped step; raise NonFiniteLossError after `max_nonfinite` of them in a row."""
    run.skipped += 1
    run.nonfinite_in_row += 1
    log.warning(
        "step %d: non-finite loss or gradient, step skipped (%d in a row)", run.step, run.nonfinite_in_row
    )
    if run.nonfinite_in_row >= run.opts.max_nonfinite:
        bar.close()
        run.logger.close()
        raise NonFiniteLossError(
            f"{run.nonfinite_in_row} consecutive non-finite steps at step {run.step}; the last good "
            f"checkpoint is kept in {run.store.location}"
        )
    run.step += 1
    bar.update(1)


def _record(run: _Run, meter: _Meter, result: StepResult, lr: float, bar) -> None:
    """After an applied step: the step's metrics every `log_every` steps, the latent statistics and a sample
    grid every `eval_every` steps, both at the last step."""
    opts, ctx, step = run.opts, run.ctx, run.step
    meter.images += result.images * ctx.world_size
    diag = run.objective.kl_diag
    meter.kl_sum = diag if meter.kl_sum is None else meter.kl_sum + diag
    meter.kl_steps += 1
    if step % opts.log_every == 0 or step == opts.steps:
        now = time.perf_counter()
        last = _step_metrics(run.cfg, ctx, result.terms, lr, result.grad_norm, run.scaler, run.skipped)
        last["img_per_s"] = meter.images / max(now - meter.t_log, 1e-9)
        meter.images, meter.t_log, meter.last = 0, now, last
        run.logger.log_step(step, last)
        bar.set_postfix(
            loss=f"{last['loss']:.1f}", bpd=f"{last['nelbo_bpd']:.3f}", img_s=f"{last['img_per_s']:.1f}"
        )
    if meter.kl_sum is not None and ((opts.eval_every and step % opts.eval_every == 0) or step == opts.steps):
        _evaluate_interval(run.model, ctx, run.logger, opts, step, meter.kl_sum / meter.kl_steps)
        meter.kl_sum, meter.kl_steps = None, 0


def _checkpoint(run: _Run) -> str:
    """Save the run at its current step (every rank's RNG state gathered, the main rank writes); where it went."""
    opts, ctx, step = run.opts, run.ctx, run.step
    run.saved_step = step
    rng = gather_objects(ctx, _rng_state(ctx.device))
    location = run.store.location
    if ctx.is_main:
        epoch, batch = divmod(step * opts.grad_accum, opts.batches_per_epoch)
        location = run.store.save(
            {
                "format": FORMAT,
                "version": VERSION,
                "config": run.cfg.to_json(),
                "model": run.model.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "scaler": run.scaler.state_dict(),
                "step": step,
                "epoch": epoch,
                "batch_in_epoch": batch,
                "batches_per_epoch": opts.batches_per_epoch,
                "grad_accum": opts.grad_accum,
                "total_steps": opts.steps,
                "seed": opts.seed,
                "world_size": ctx.world_size,
                "precision": opts.precision,
                "skipped": run.skipped,
                "nonfinite_in_row": run.nonfinite_in_row,
                "rng": rng,
                "rng_cpu": rng[0]["cpu"],
            },
            step,
        )
        log.debug("checkpoint of step %d -> %s", step, location)
    barrier(ctx)
    return location


def _finish(run: _Run, last: dict[str, Any]) -> dict[str, Any]:
    """Check that the ranks agree, write the final checkpoint (unless the last step's is stored) and the
    summary (`train_summary.json`, main rank); returns the summary."""
    ctx = run.ctx
    digest = check_in_sync(ctx, run.model)
    location = run.store.location
    if run.saved_step != run.step:
        location = _checkpoint(run)
    run.logger.close()
    summary = {
        "steps": run.step,
        "skipped_steps": run.skipped,
        "world_size": ctx.world_size,
        "precision": run.opts.precision,
        "checkpoint": location,
        "param_digest": digest,
        **{f"last_{k}": v for k, v in last.items()},
    }
    if ctx.is_main:
        atomic_write_json(run.opts.out / "train_summary.json", summary)
    return summary


def _resume(
    payload, cfg, model, optimizer, scaler, ctx: DistContext, opts: TrainOptions
) -> tuple[int, int, int]:
    """Load a checkpoint's state into the live objects; returns (step, skipped, non-finite in a row)."""
    if config_from_checkpoint(payload) != cfg:
        raise NVAEError(
            "the checkpoint was written with another configuration; use a new --out to start afresh"
        )
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    if payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])  # a no-op unless this run scales its loss (fp16)
    elif scaler.is_enabled():
        log.warning("the checkpoint holds no loss scale (it ran without fp16): the scale starts afresh")
    step = int(payload["step"])
    if int(payload.get("grad_accum", 1)) != opts.grad_accum:
        raise NVAEError(
            f"the checkpoint was written with --grad-accum {payload.get('grad_accum', 1)}, this run asks for "
            f"{opts.grad_accum}: the data position and the schedules would not match; use the same value"
        )
    for key, now in (("total_steps", opts.steps), ("batches_per_epoch", opts.batches_per_epoch)):
        if key in payload and int(payload[key]) != now:
            log.warning(
                "%s was %s and is now %s: the schedules continue from step %d", key, payload[key], now, step
            )
    rng = payload.get("rng")
    if rng is not None and len(rng) == ctx.world_size:
        _set_rng_state(rng[ctx.rank], ctx.device)
    elif rng is None:
        log.info("the checkpoint holds no RNG state (an authors' checkpoint): reseeding")
        torch.manual_seed(opts.seed + 100_003 * ctx.rank + step)
    else:
        log.warning(
            "checkpoint has RNG states for %s ranks, this job has %d: reseeding",
            len(rng or []),
            ctx.world_size,
        )
        torch.manual_seed(opts.seed + 100_003 * ctx.rank + step)
    return step, int(payload.get("skipped", 0)), int(payload.get("nonfinite_in_row", 0))


def _step_metrics(cfg, ctx, terms: LossTerms, lr, grad_norm, scaler, skipped) -> dict[str, Any]:
    """The per-step scalars, averaged over ranks where they differ per rank."""
    local = torch.stack(
        [
            terms.loss.detach().float(),
            terms.nelbo.mean().float(),
            terms.recon.mean().float(),
            terms.kl.mean().float(),
        ]
    )
    loss, nelbo, recon, kl = mean_over_ranks(ctx, local).tolist()
    values = {
        "loss": loss,
        "nelbo_bpd": nelbo / (math.log(2) * cfg.dims),
        "recon": recon,
        "kl": kl,
        "beta": terms.beta,
        "lambda": terms.lam,
        "lr": lr,
        "grad_norm": float(grad_norm),
        "spectral": float(terms.spectral),
        "bn": float(terms.bn),
        "skipped": skipped,
    }
    if scaler.is_enabled():
        values["loss_scale"] = float(scaler.get_scale())
    return values


def _evaluate_interval(
    model: NVAE, ctx: DistContext, logger: RunLogger, opts: TrainOptions, step: int, kl_diag
):
    """KL per group and active latent channels over the interval (all ranks), and a sample grid (main rank)."""
    stats = latent_stats(mean_over_ranks(ctx, kl_diag))
    grid_path = None
    if ctx.is_main and opts.sample_count > 0:
        from data.images import image_grid, save_png
        from model.prior_sampling import sample_images

        model.eval()
        with _rng_guard(ctx.device):
            images = sample_images(model, opts.sample_count, opts.sample_temperature, seed=opts.seed)
        model.train()
        grid_path = opts.out / "samples" / f"step-{step:08d}.png"
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        save_png(image_grid(images), grid_path)
    logger.log_interval(step, stats, grid_path)


__all__ = [
    "NonFiniteLossError",
    "Objective",
    "StepResult",
    "TrainOptions",
    "TrainingInterrupted",
    "cpu_bf16_is_faster",
    "default_precision",
    "learning_rate",
    "make_optimizer",
    "train",
    "training_step",
]
