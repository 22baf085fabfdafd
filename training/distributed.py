"""Process-group helpers for training under torchrun: who am I, which device, SyncBatchNorm, agreement.

Nothing here is required: without torchrun's environment (`WORLD_SIZE` unset or 1) the context is a single
process and every collective is a no-op, so the same training program runs alone or under any launcher.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from common.errors import NVAEError
from model.layers import BatchNormSwish, SyncBatchNormSwish

log = logging.getLogger(__name__)


class RankDivergenceError(NVAEError):
    """Ranks that should hold identical parameters do not."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: rank among `world_size`, its device and the collective backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_main_process() -> bool:
    """Whether this process is rank 0 of its torchrun job, or runs alone (from the environment; true before
    `init_distributed` as after it)."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device: str | None = None) -> DistContext:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo on CPU).

    `device`: 'cpu', 'cuda' or None (CUDA when available). Under torchrun each process takes
    `cuda:LOCAL_RANK`. Without torchrun's variables, returns a single-process context.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind.startswith("cuda"):
        if not torch.cuda.is_available():
            raise NVAEError(f"device={kind!r} requested but no CUDA device is available")
        index = torch.device(kind).index
        dev = torch.device("cuda", local_rank if world_size > 1 or index is None else index)
        torch.cuda.set_device(dev)
    elif kind == "cpu":
        dev = torch.device("cpu")
    else:
        raise NVAEError(f"device={kind!r}: use 'cpu' or 'cuda[:N]'")
    if world_size <= 1:
        return DistContext(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    log.info("rank %d of %d on %s (%s)", rank, world_size, dev, backend)
    return DistContext(rank, world_size, local_rank, dev, backend)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (a no-op for a single process)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BN layer by its synchronised version, keeping parameters, buffers and the Swish.

    `BatchNormSwish` -> `SyncBatchNormSwish`, any other `BatchNorm2d` -> `nn.SyncBatchNorm`. Only for
    multi-GPU CUDA training: SyncBatchNorm raises on CPU tensors inside a process group.
    """
    out = module
    if isinstance(module, nn.BatchNorm2d):
        cls = SyncBatchNormSwish if isinstance(module, BatchNormSwish) else nn.SyncBatchNorm
        out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child))
    return out


def any_flags(ctx: DistContext, *flags: bool) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (one small all-reduce), so every rank decides alike."""
    if not ctx.distributed:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def mean_over_ranks(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    """Average a float tensor over all ranks (returns a new tensor; the input is untouched)."""
    if not ctx.distributed:
        return values.clone()
    t = values.detach().to(ctx.device, torch.float64).clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / ctx.world_size).to(values.dtype)


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def parameter_digest(module: nn.Module) -> str:
    """SHA-256 over every parameter's bytes in name order: equal digests mean bitwise-equal parameters."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())  # C order whatever the memory format
    return h.hexdigest()


def check_in_sync(ctx: DistContext, module: nn.Module) -> str:
    """Raise RankDivergenceError unless every rank holds bitwise-identical parameters; returns the digest."""
    digest = parameter_digest(module)
    digests = gather_objects(ctx, digest)
    if len(set(digests)) != 1:
        raise RankDivergenceError(f"ranks hold different parameters: digests {digests}")
    return digest


__all__ = [
    "DistContext",
    "RankDivergenceError",
    "init_distributed",
    "is_main_process",
    "shutdown",
    "convert_sync_batchnorm",
    "any_flags",
    "mean_over_ranks",
    "gather_objects",
    "barrier",
    "parameter_digest",
    "check_in_sync",
]
