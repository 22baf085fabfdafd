"""Progress that reads well where it is read: a tqdm bar on a terminal; elsewhere (pod logs, kfp.local,
CI, a file) one log line every 10 % or every 60 seconds, whichever comes first, and one at the end. The first
line comes at the first update after 5 seconds that follows a second update, so long work shows its rate and
eta early. Rates leave out the first item (a first training step or pass includes warm-up, which would make the
eta many times too long).

`NVAE_PROGRESS=bar|lines|off` overrides the choice.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from common.errors import ConfigError

log = logging.getLogger("nvae.progress")

EVERY_FRACTION = 0.1
EVERY_SECONDS = 60.0
FIRST_SECONDS = 5.0


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    disable: bool = False,
    **tqdm_options: Any,
):
    """A tqdm bar or a `LineProgress` with the same small interface: iteration, `update(n)`,
    `set_postfix(**values)`, `close()`, and use as a context manager."""
    mode = os.environ.get("NVAE_PROGRESS") or ("bar" if sys.stderr.isatty() else "lines")
    if mode not in ("bar", "lines", "off"):
        raise ConfigError(f"NVAE_PROGRESS={mode!r}; choose bar, lines or off")
    if mode == "bar":
        from tqdm import tqdm

        return tqdm(
            iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, **tqdm_options
        )
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return LineProgress(
        iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable or mode == "off"
    )


class LineProgress:
    """Log `desc: n/total unit (p%), rate, eta, postfix` every `every_fraction` of the total or every
    `every_seconds` (the first line after `first_seconds`), and once when closed."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        disable: bool = False,
        every_fraction: float = EVERY_FRACTION,
        every_seconds: float = EVERY_SECONDS,
        first_seconds: float = FIRST_SECONDS,
        clock=time.monotonic,
    ):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.start_n = initial
        self.disable, self.clock = disable, clock
        self.every_fraction, self.every_seconds = every_fraction, every_seconds
        self.first_seconds = first_seconds
        self.emitted = False
        self.first_time: float | None = None
        self.first_n = initial
        self.start = self.last_time = clock()
        self.last_n = initial
        self.postfix = ""
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **values: Any) -> None:
        values = {**(ordered_dict or {}), **values}
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        now = self.clock()
        if self.first_time is None:  # the end of the first item, which often includes warm-up
            self.first_time, self.first_n = now, self.n
        due = now - self.last_time >= self.every_seconds or (
            not self.emitted and now - self.start >= self.first_seconds and self.n > self.first_n
        )
        if self.total:
            step = max(1, int(self.total * self.every_fraction))
            due = due or self.n // step > self.last_n // step
        if due and (self.total is None or self.n < self.total):
            self._emit(now)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.disable and self.n != self.last_n:
            self._emit(self.clock())

    def _emit(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        if self.first_time is not None and self.n > self.first_n and now > self.first_time:
            rate = (self.n - self.first_n) / (now - self.first_time)  # past the first item's warm-up
        else:
            rate = (self.n - self.start_n) / elapsed
        parts = [f"{self.n}/{self.total}" if self.total else f"{self.n}", self.unit]
        text = " ".join(parts)
        if self.total:
            text += f" ({100 * self.n / self.total:.0f}%)"
        text += f", {rate:.3g} {self.unit}/s, {elapsed:.0f} s"
        if self.total and rate > 0 and self.n < self.total:
            text += f", eta {(self.total - self.n) / rate:.0f} s"
        if self.postfix:
            text += f", {self.postfix}"
        log.info("%s: %s", self.desc or "progress", text)
        self.last_time, self.last_n, self.emitted = now, self.n, True
