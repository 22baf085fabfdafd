"""Device and precision helpers: autocast contexts and CPU set-up. Nothing here runs at import time."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")


def configure_cpu() -> None:
    """Flush denormal floats on CPU: they stall NVAE's steps up to 25x during the early KL blow-up."""
    torch.set_flush_denormal(True)


def autocast(device: torch.device | str, precision: str):
    """Autocast context for `precision` on `device` (fp32: none). fp16 autocast needs CUDA."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; choose one of: {', '.join(PRECISIONS)}")
    device_type = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device_type != "cuda":
        raise ValueError("precision=fp16 needs a CUDA device (use bf16 on CPU)")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)
