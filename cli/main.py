"""`nvae`: one entry point for the whole product; each subcommand is a few lines over a library function.

Subcommands are registered by the layer that owns them (`cli.train`, `cli.data`, ...), each exposing
`register(subparsers)`. The product's own errors for bad input (`NVAEError` and its subclasses, such as
`ConfigError`) and the operating system's errors about a file (a path that is missing, not writable, a folder
where a file should be, a full disk) become one clear line on stderr and exit code 2. Anything else, a
`ValueError` from deep in a library included, is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import sys

# Modules that contribute subcommands, in the order `nvae --help` lists them.
_COMMAND_MODULES = (
    "cli.data",
    "cli.train",
    "cli.inference",
    "cli.serve",
    "cli.pipeline",
    "cli.store",
    "cli.model",
    "cli.nvlabs",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nvae",
        description="NVAE pipeline: prepare data, train, evaluate, readjust BN, export ONNX, sample.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that layer has no commands yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from common.errors import NVAEError

    try:
        with _run_locks(args):
            return int(args.func(args) or 0)
    except NVAEError as exc:
        print(f"nvae {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:  # not about a path the user gave: keep the traceback
            raise
        print(f"nvae {args.command}: error: {_os_error(exc)}", file=sys.stderr)
        return 2


# The options that name what a command writes; a command whose output lies inside a training run holds that
# run's lock while it runs (`common.files.run_locks`). `train` takes its own run's lock itself.
_OUTPUT_OPTIONS = ("out", "kl_plot", "manifest_out")


def _run_locks(args: argparse.Namespace):
    from common.files import run_locks

    if getattr(args, "locks_own_run", False):
        return contextlib.nullcontext()
    written = [getattr(args, name) for name in _OUTPUT_OPTIONS if getattr(args, name, None)]
    return run_locks([p for p in written if isinstance(p, str) and "://" not in p], f"nvae {args.command}")


def _os_error(exc: OSError) -> str:
    """One line naming the file and the cause: 'cannot write /x/y: Permission denied'."""
    cause = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        cause = "no space left on device"
    where = exc.filename if exc.filename is not None else ""
    return f"{where}: {cause}" if where else cause


if __name__ == "__main__":
    sys.exit(main())
