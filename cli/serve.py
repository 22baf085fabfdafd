"""`nvae serve`: the ONNX sampler over HTTP. The command is defined by the serving package itself
(`serving.__main__`), so the slim serving image runs the same one as `python -m serving`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from serving.__main__ import DESCRIPTION, add_arguments, run

    p = sub.add_parser(
        "serve",
        help="serve an exported decoder over HTTP (Open Inference Protocol v2)",
        description=DESCRIPTION,
    )
    add_arguments(p)
    p.set_defaults(func=run)
