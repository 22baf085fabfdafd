"""Device and precision helpers: autocast contexts and CPU set-up. Nothing here runs at import time."""

from __future__ import annotations

import contextlib
import ctypes

import torch

from common.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


def configure_cpu(keep_freed_memory: bool = True) -> None:
    """Flush denormal floats on CPU: arithmetic on them is many times slower, and the early KL blow-up
    produces many, which would stall NVAE's steps.

    With `keep_freed_memory`, also stop glibc's malloc from returning freed activation memory to the kernel
    (see `keep_malloc_arena`): a training step then stops re-faulting its pages every step.
    """
    torch.set_flush_denormal(True)
    if keep_freed_memory:
        keep_malloc_arena()


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_malloc_arena() -> bool:
    """Serve tensors up to 32 MiB from the malloc heap and never trim it (glibc only; True when applied).

    By default glibc maps large blocks with mmap and unmaps them on free, so every step's activations are
    page-faulted in afresh; kept in the heap, their pages are reused from one step to the next. 32 MiB is the
    largest threshold glibc accepts on 64-bit; larger blocks are still mmap'd (hence `evaluate`'s small
    passes on CPU).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return all(
            libc.mallopt(param, value) == 1
            for param, value in (
                (_M_MMAP_THRESHOLD, 32 * 1024 * 1024),
                (_M_TRIM_THRESHOLD, 2**31 - 1),
                (_M_TOP_PAD, 64 * 1024 * 1024),
            )
        )
    except (OSError, AttributeError):  # not glibc
        return False


def autocast(device: torch.device | str, precision: str):
    """Autocast context for `precision` on `device` (fp32: none). fp16 autocast needs CUDA."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}; choose one of: {', '.join(PRECISIONS)}")
    device_type = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device_type != "cuda":
        raise ConfigError("precision=fp16 needs a CUDA device (use bf16 on CPU)")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)
