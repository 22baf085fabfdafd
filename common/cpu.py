"""What the CPU can do, from /proc/cpuinfo: the one place that parses it.

Dependency-free, so serving/ may use it too. On a machine without /proc/cpuinfo every answer is empty."""

from __future__ import annotations

import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_text() -> str:
    try:
        return CPUINFO.read_text()
    except OSError:
        return ""


def _field(cpuinfo: str, names: tuple[str, ...]) -> str | None:
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in names:
            return value.strip()
    return None


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The first processor's feature flags (x86 `flags`, Arm `Features`)."""
    value = _field(cpuinfo_text() if cpuinfo is None else cpuinfo, ("flags", "Features"))
    return set(value.split()) if value else set()


def cpu_flags_line(cpuinfo: str | None = None) -> str:
    """The flags as /proc/cpuinfo lists them, in its order (a cache key that changes with the CPU)."""
    return " ".join((_field(cpuinfo_text() if cpuinfo is None else cpuinfo, ("flags", "Features")) or "").split())


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name, or the platform's processor name where /proc/cpuinfo has none."""
    value = _field(cpuinfo_text() if cpuinfo is None else cpuinfo, ("model name",))
    return value or platform.processor() or platform.machine()
