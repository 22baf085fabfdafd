"""`nvae store init`: the bucket and its lifecycle rule, a few lines over `common.s3`."""

from __future__ import annotations

import argparse


def cmd_init(args: argparse.Namespace) -> int:
    from common.s3 import ensure_bucket

    for line in ensure_bucket(args.bucket):
        print(line)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="set up the S3-API object store the pipeline uses")
    ssub = p.add_subparsers(dest="store_command", metavar="ACTION")
    ssub.required = True
    i = ssub.add_parser(
        "init",
        help="create the bucket (if missing) and a rule that aborts incomplete multipart uploads",
        description="Idempotent. Endpoint and keys come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (the nvae-s3-credentials Secret).",
    )
    i.add_argument("--bucket", default="nvae")
    i.set_defaults(func=cmd_init)
