"""Command-line argument types shared by the `nvae` command groups and `python -m serving`: each rejects a
bad value with a message naming the option and its allowed range (argparse then exits with status 2)."""

from __future__ import annotations

import argparse
import math


def int_in(name: str, low: int, high: int | None = None):
    """An integer option with `low <= value (<= high)`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"{name} must be {allowed}, got {value}")
        return value

    return parse


def positive_int(name: str):
    """An integer option >= 1 (a count or length where 0 would mean nothing)."""
    return int_in(name, 1)


# The highest sampling temperature the commands take, as the sampling server's default `max_temperature`:
# NVAE samples well below 1; far above it the prior's latents grow until the decoder overflows float32.
MAX_TEMPERATURE = 10.0


def temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"temperature must be a number, got {text!r}") from None
    if not (0 < value <= MAX_TEMPERATURE):
        raise argparse.ArgumentTypeError(f"temperature must be in (0, {MAX_TEMPERATURE:g}], got {text}")
    return value


def seconds(name: str, high: float = 3600.0):
    """A duration option: a finite number of seconds in (0, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and 0 < value <= high):
            raise argparse.ArgumentTypeError(
                f"{name} must be a number of seconds in (0, {high:g}], got {text!r}"
            )
        return value

    return parse
