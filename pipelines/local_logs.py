"""Task logs of local runs, made readable: kfp's executor prints each task's whole executor input as
indented JSON (30-90 lines a task, most of a short run's log) before the step's own output; locally it is
folded into one line. `NVAE_FULL_EXECUTOR_LOG=1` keeps it. (On a cluster the pod log is KFP's own.)
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Iterator

MARKER = "Got executor_input:"


def fold_executor_input(lines: Iterable[str]) -> Iterator[str]:
    """Pass lines through, replacing the JSON block after the executor's MARKER line by a one-line note."""
    if os.environ.get("NVAE_FULL_EXECUTOR_LOG") == "1":
        yield from lines
        return
    folding, depth, count = False, 0, 0
    for line in lines:
        if folding:
            if count == 0 and not line.lstrip().startswith("{"):
                folding = False  # not the JSON block this expects: leave the log as it is
                yield line
                continue
            count += 1
            depth += line.count("{") - line.count("}")
            if depth <= 0:
                folding = False
                yield f"    (executor input: {count} lines of JSON folded; NVAE_FULL_EXECUTOR_LOG=1 shows them)\n"
            continue
        if line.rstrip().endswith(MARKER):
            folding, depth, count = True, 0, 0
        yield line


def lines_of(chunks: Iterable[bytes]) -> Iterator[str]:
    """Decoded text lines from a stream of byte chunks (a container's log)."""
    pending = ""
    for chunk in chunks:
        pending += chunk.decode(errors="replace")
        *complete, pending = pending.split("\n")
        for line in complete:
            yield line + "\n"
    if pending:
        yield pending


def run_local_subprocess(full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
    """kfp.local's subprocess task runner (same contract: stream the task's output, return its status),
    with the executor input folded."""
    env = {**os.environ, **env_vars} if env_vars else None
    with subprocess.Popen(
        full_command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
    ) as process:
        for line in fold_executor_input(iter(process.stdout.readline, "")):
            print(line, end="", flush=True)
        return process.wait()
