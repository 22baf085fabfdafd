"""Single-process training loop of the released recipe: AdaMax, lr warm-up + cosine, KL warm-up and
balancing, spectral and BN regularization, autocast, checkpoints that resume.

The data source is a callable `batches(epoch, start_batch)` yielding float tensors (B, C, D, D) in [0, 1],
so this module knows nothing of files or formats.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from model.checkpoint import config_from_checkpoint, read_checkpoint, save_checkpoint
from model.config import NVAEConfig
from model.errors import NVAEError
from model.network import NVAE
from model.objective import kl_balance_alphas, nvae_loss
from model.runtime import autocast, configure_cpu

log = logging.getLogger(__name__)

BatchSource = Callable[[int, int], Iterable[torch.Tensor]]


class NonFiniteLossError(NVAEError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainOptions:
    steps: int  # optimisation steps in total
    batches_per_epoch: int
    out: Path
    precision: str = "fp32"
    device: str = "cpu"
    seed: int = 0
    checkpoint_every: int = 0  # 0: only at the end
    log_every: int = 10
    max_nonfinite: int = 10
    progress: bool = True


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


def _latest_checkpoint(out: Path) -> Path | None:
    path = out / "checkpoint.pt"
    return path if path.is_file() else None


def train(cfg: NVAEConfig, batches: BatchSource, opts: TrainOptions) -> dict[str, Any]:
    """Train (or resume in `opts.out`) for `opts.steps` steps; returns a summary of the run."""
    device = torch.device(opts.device)
    if device.type == "cpu":
        configure_cpu()
    opts.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    model = NVAE(cfg).to(device)
    optimizer = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, init_scale=1024.0, enabled=opts.precision == "fp16")
    step = 0
    ckpt = _latest_checkpoint(opts.out)
    if ckpt is not None:
        payload = read_checkpoint(ckpt, device)
        if config_from_checkpoint(payload) != cfg:
            raise NVAEError(f"{ckpt} was written with another configuration; use a new --out to start afresh")
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scaler.load_state_dict(payload["scaler"])
        step = int(payload["step"])
        torch.set_rng_state(payload["rng_cpu"])
        log.info("resumed from %s at step %d", ckpt, step)
    alphas = kl_balance_alphas(cfg.groups_per_scale).to(device)
    metrics_path = opts.out / "train_metrics.jsonl"

    def checkpoint() -> None:
        save_checkpoint(
            opts.out / "checkpoint.pt",
            model,
            extra={
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "step": step,
                "rng_cpu": torch.get_rng_state(),
            },
        )

    model.train()
    nonfinite_in_row = skipped = 0
    bar = tqdm(total=opts.steps, initial=step, disable=not opts.progress, desc="train", unit="step")
    start, seen, last = time.perf_counter(), 0, {}
    while step < opts.steps:
        epoch, start_batch = divmod(step, opts.batches_per_epoch)
        for x in batches(epoch, start_batch):
            if step >= opts.steps:
                break
            x = x.to(device, non_blocking=True)
            lr = learning_rate(cfg, step, opts.steps, opts.batches_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, opts.precision):
                terms = nvae_loss(model, x, step, opts.steps, alphas)
            scaler.scale(terms.loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            if not (torch.isfinite(terms.loss) and torch.isfinite(grad_norm)):
                skipped += 1
                nonfinite_in_row += 1
                log.warning(
                    "step %d: non-finite loss or gradient, step skipped (%d in a row)", step, nonfinite_in_row
                )
                optimizer.zero_grad(set_to_none=True)
                scaler.update()
                if nonfinite_in_row >= opts.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{nonfinite_in_row} consecutive non-finite steps at step {step}; the last good "
                        f"checkpoint is kept in {opts.out}"
                    )
                step += 1
                bar.update(1)
                continue
            nonfinite_in_row = 0
            scaler.step(optimizer)
            scaler.update()
            step += 1
            seen += x.size(0)
            bar.update(1)
            if step % opts.log_every == 0 or step == opts.steps:
                bpd = float(terms.nelbo.mean()) / (math.log(2) * cfg.dims)
                last = {
                    "step": step,
                    "loss": float(terms.loss.detach()),
                    "nelbo_bpd": bpd,
                    "recon": float(terms.recon.mean()),
                    "kl": float(terms.kl.mean()),
                    "beta": terms.beta,
                    "lambda": terms.lam,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "spectral": float(terms.spectral),
                    "bn": float(terms.bn),
                    "img_per_s": seen / (time.perf_counter() - start),
                    "skipped": skipped,
                }
                bar.set_postfix(
                    loss=f"{last['loss']:.1f}", bpd=f"{bpd:.3f}", img_s=f"{last['img_per_s']:.1f}"
                )
                with metrics_path.open("a") as fh:
                    fh.write(json.dumps(last) + "\n")
            if opts.checkpoint_every and step % opts.checkpoint_every == 0:
                checkpoint()
    bar.close()
    checkpoint()
    summary = {
        "steps": step,
        "skipped_steps": skipped,
        **{f"last_{k}": v for k, v in last.items() if k != "step"},
    }
    atomic_write_json(opts.out / "train_summary.json", summary)
    return summary


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


__all__ = ["TrainOptions", "train", "learning_rate", "make_optimizer"]
