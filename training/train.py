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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import DataError, NVAEError
from common.files import atomic_write_json
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
from training.storage import open_store

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
    channels_last: bool | None = None  # None: on for CPU (1.4x faster steps there), off on CUDA
    compile: bool = False
    handle_signals: bool = True  # checkpoint and stop on SIGTERM/SIGINT (main thread only)
    dist: DistContext | None = None
    # Batches whose gradients are summed into one optimisation step: with N processes the step sees
    # grad_accum x N x batch_size images (reach the recipe's global batch on fewer GPUs). BN statistics still
    # come from each batch alone, and the spectral regularizer's power iteration advances once per batch.
    grad_accum: int = 1

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
    BF16 on Arm). Not without native bf16 (oneDNN emulates it: ~4x slower than fp32, measured on AVX2), and not
    with AVX512-BF16 alone, where fp32 was measured faster (AMD EPYC, 2 threads: `fmnist-cpu` 110.6 against
    92.4 img/s, `mnist` 21.7 against 19.1; bench/RESULTS.md)."""
    flags = _cpu_flags(cpuinfo)
    return bool(flags & {"amx_bf16", "bf16"})


def _cpu_flags(cpuinfo: str | None) -> set[str]:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


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

    def __enter__(self) -> _StopSignals:
        if self.enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------------------------ the loop


def train(cfg: NVAEConfig, batches: BatchSource, opts: TrainOptions) -> dict[str, Any]:
    """Train (or resume from the checkpoint store) for `opts.steps` steps; returns a summary of the run.

    Raises NonFiniteLossError after `max_nonfinite` non-finite steps in a row (the last good checkpoint is
    kept), TrainingInterrupted after checkpointing on SIGTERM/SIGINT.
    """
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
    if payload is not None:
        step, skipped, nonfinite_in_row = _resume(payload, cfg, model, optimizer, scaler, ctx, opts)
        log.info("resumed from %s at step %d", store.location, step)

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
    logger = RunLogger(opts.out, enabled=ctx.is_main, resume=payload is not None, dvclive=opts.dvclive)

    saved_step = step if payload is not None else -1

    def checkpoint() -> str:
        nonlocal saved_step
        saved_step = step
        rng = gather_objects(ctx, _rng_state(device))
        location = store.location
        if ctx.is_main:
            epoch, batch = divmod(step * opts.grad_accum, opts.batches_per_epoch)
            location = store.save(
                {
                    "format": FORMAT,
                    "version": VERSION,
                    "config": cfg.to_json(),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "step": step,
                    "epoch": epoch,
                    "batch_in_epoch": batch,
                    "batches_per_epoch": opts.batches_per_epoch,
                    "grad_accum": opts.grad_accum,
                    "total_steps": opts.steps,
                    "seed": opts.seed,
                    "world_size": ctx.world_size,
                    "precision": opts.precision,
                    "skipped": skipped,
                    "nonfinite_in_row": nonfinite_in_row,
                    "rng": rng,
                    "rng_cpu": rng[0]["cpu"],
                },
                step,
            )
            log.debug("checkpoint of step %d -> %s", step, location)
        barrier(ctx)
        return location

    model.train()
    world_batch_images = 0
    last: dict[str, Any] = {}
    kl_sum: torch.Tensor | None = None
    kl_steps = 0
    bar = progress_bar(
        total=opts.steps,
        initial=step,
        disable=not (opts.progress and ctx.is_main),
        desc="train",
        unit="step",
        dynamic_ncols=True,
    )
    t_log = time.perf_counter()

    def batch_stream(first_step: int):
        """The training batches from the position of `first_step`, across epochs (each epoch its own
        shuffle, as a fresh run would see it)."""
        position = first_step * opts.grad_accum
        while True:
            epoch, start_batch = divmod(position, opts.batches_per_epoch)
            produced = False
            for x in batches(epoch, start_batch):
                produced = True
                position += 1
                yield x
            if not produced:
                raise DataError(
                    f"the data source yielded no batch for epoch {epoch} from batch {start_batch}"
                )

    with _rng_guard(device):
        stream = batch_stream(step)
    with _StopSignals(opts.handle_signals) as stop:
        while step < opts.steps:
            lr = learning_rate(cfg, step, opts.steps, opts.steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            step_images = 0
            loss_finite = True
            for micro in range(opts.grad_accum):
                with _rng_guard(device):
                    x = next(stream)
                x = x.to(device, non_blocking=True)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                step_images += x.size(0)
                last_micro = micro == opts.grad_accum - 1
                # DDP all-reduces the gradients once, on the last batch of the step
                sync = net.no_sync() if ctx.distributed and not last_micro else contextlib.nullcontext()
                with sync:
                    with autocast(device, opts.precision):
                        terms = net(x, step, opts.steps)
                    loss_finite = loss_finite and bool(torch.isfinite(terms.loss))
                    loss = terms.loss / opts.grad_accum if opts.grad_accum > 1 else terms.loss
                    scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            finite = loss_finite and bool(torch.isfinite(grad_norm))
            bad, stopping = any_flags(ctx, not finite, stop.signum is not None)
            if bad:
                skipped += 1
                nonfinite_in_row += 1
                log.warning(
                    "step %d: non-finite loss or gradient, step skipped (%d in a row)",
                    step,
                    nonfinite_in_row,
                )
                optimizer.zero_grad(set_to_none=True)
                scaler.update()
                if nonfinite_in_row >= opts.max_nonfinite:
                    bar.close()
                    logger.close()
                    raise NonFiniteLossError(
                        f"{nonfinite_in_row} consecutive non-finite steps at step {step}; the last good "
                        f"checkpoint is kept in {store.location}"
                    )
                step += 1
                bar.update(1)
            else:
                nonfinite_in_row = 0
                scaler.step(optimizer)
                scaler.update()
                step += 1
                bar.update(1)
                world_batch_images += step_images * ctx.world_size
                diag = objective.kl_diag
                kl_sum = diag if kl_sum is None else kl_sum + diag
                kl_steps += 1
                if step % opts.log_every == 0 or step == opts.steps:
                    now = time.perf_counter()
                    last = _step_metrics(cfg, ctx, terms, lr, grad_norm, scaler, skipped)
                    last["img_per_s"] = world_batch_images / max(now - t_log, 1e-9)
                    world_batch_images, t_log = 0, now
                    logger.log_step(step, last)
                    bar.set_postfix(
                        loss=f"{last['loss']:.1f}",
                        bpd=f"{last['nelbo_bpd']:.3f}",
                        img_s=f"{last['img_per_s']:.1f}",
                    )
                if kl_sum is not None and (
                    (opts.eval_every and step % opts.eval_every == 0) or step == opts.steps
                ):
                    _evaluate_interval(model, ctx, logger, opts, step, kl_sum / kl_steps)
                    kl_sum, kl_steps = None, 0
            if opts.checkpoint_every and step % opts.checkpoint_every == 0:
                checkpoint()
            if stopping:
                bar.close()
                location = checkpoint()
                logger.close()
                signum = stop.signum or signal.SIGTERM
                raise TrainingInterrupted(signum, step, location)
    bar.close()
    digest = check_in_sync(ctx, model)
    location = store.location
    if saved_step != step:
        location = checkpoint()
    logger.close()
    summary = {
        "steps": step,
        "skipped_steps": skipped,
        "world_size": ctx.world_size,
        "precision": opts.precision,
        "checkpoint": location,
        "param_digest": digest,
        **{f"last_{k}": v for k, v in last.items()},
    }
    if ctx.is_main:
        atomic_write_json(opts.out / "train_summary.json", summary)
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
    scaler.load_state_dict(payload["scaler"])
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
    "TrainOptions",
    "TrainingInterrupted",
    "cpu_bf16_is_faster",
    "default_precision",
    "learning_rate",
    "make_optimizer",
    "train",
]
