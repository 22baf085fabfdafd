"""`nvae store init`: the bucket, its lifecycle rule and (with --users) the workloads' scoped users, a few lines
over `common.s3` and `common.store_admin`."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from common.store_admin import DEFAULT_SAMPLER_PREFIX

EXIT_RETRYABLE = 75  # the store is unreachable, starting, timing out or throttling (EX_TEMPFAIL): run again


def exit_75_when_retryable(func):
    """A command whose retryable StorageError (the store unreachable, starting, throttling) exits 75 with one
    line; permanent ones go on to cli.main (one line, exit 2)."""

    @functools.wraps(func)  # the command's own name and module, as the parser's reader sees them
    def run(args: argparse.Namespace) -> int:
        from common.errors import StorageError

        try:
            return func(args)
        except StorageError as exc:
            if not exc.retryable:
                raise
            print(f"nvae {args.command}: error: {exc}", file=sys.stderr)
            return EXIT_RETRYABLE

    return run


@exit_75_when_retryable
def cmd_init(args: argparse.Namespace) -> int:
    from common.s3 import ensure_bucket
    from common.store_admin import ensure_users, users_from_env

    users = users_from_env(args.bucket, args.sampler_prefix) if args.users else []  # checked first
    for line in ensure_bucket(args.bucket):
        print(line)
    for line in ensure_users(users) if users else []:
        print(line)
    return 0


@exit_75_when_retryable
def cmd_get(args: argparse.Namespace) -> int:
    from common.errors import StorageError
    from common.s3 import download_object
    from data.remote import fetch_source

    if args.uri.endswith("/"):
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise StorageError(f"{args.out}: not a folder (the objects under {args.uri} go into a folder)")
        count = len(fetch_source(args.uri, args.out))
        print(f"fetched {args.uri} -> {args.out}/ ({count} files)")
        return 0
    size = download_object(args.uri, args.out)
    print(f"fetched {args.uri} -> {args.out} ({size} bytes)")
    return 0


@exit_75_when_retryable
def cmd_put(args: argparse.Namespace) -> int:
    from data.remote import upload_source

    count = len(upload_source(args.folder, args.uri))
    print(f"uploaded {args.folder}/ -> {args.uri} ({count} files)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="set up the S3-API object store the pipeline uses")
    ssub = p.add_subparsers(dest="store_command", metavar="ACTION")
    ssub.required = True
    i = ssub.add_parser(
        "init",
        help="create the bucket (if missing), a rule that aborts incomplete multipart uploads and, with "
        "--users, the sampler's and the pipeline's users",
        description="Idempotent. Endpoint and root keys come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (the nvae-s3-credentials Secret); an https:// endpoint with a private CA "
        "needs AWS_CA_BUNDLE. Exit status: 0 done, 2 bad input or a permanent failure (bad keys, no admin "
        "API, untrusted certificate), 75 the store is unreachable or not ready: run again.",
    )
    i.add_argument("--bucket", default="nvae")
    i.add_argument(
        "--users",
        action="store_true",
        help="also create or update, through MinIO's admin API, a read-only user for the sampler (keys in "
        "NVAE_SAMPLER_ACCESS_KEY / NVAE_SAMPLER_SECRET_KEY) and a read-write user for the pipeline "
        "(NVAE_PIPELINE_ACCESS_KEY / NVAE_PIPELINE_SECRET_KEY), each with its own policy; MinIO only",
    )
    i.add_argument(
        "--sampler-prefix",
        default=DEFAULT_SAMPLER_PREFIX,
        help=f"the prefix of the bucket the sampler may read (default: {DEFAULT_SAMPLER_PREFIX}, where the "
        "sampler's MODEL_URI points)",
    )
    i.set_defaults(func=cmd_init)
    g = ssub.add_parser(
        "get",
        help="download one object (e.g. the sampler's decoder) to a file, or a prefix (URI ending in /) to "
        "a folder, atomically",
        description="Each file appears only when its whole object has arrived. Endpoint and keys from the "
        "environment as for init. Exit status: 0 done, 2 bad URI or a permanent failure (no such object, "
        "an empty prefix, bad keys), 75 the store is unreachable or not ready: run again.",
    )
    g.add_argument("uri", help="s3://bucket/path/to/object, or s3://bucket/prefix/ for every object under it")
    g.add_argument("--out", required=True, help="file to write (a folder for a prefix)")
    g.set_defaults(func=cmd_get)
    u = ssub.add_parser(
        "put",
        help="upload every file of a folder under an s3:// prefix, keeping relative paths",
        description="Each object appears whole or not at all. Endpoint and keys from the environment as for "
        "init. Exit status as for get.",
    )
    u.add_argument("folder", help="local folder")
    u.add_argument("uri", help="s3://bucket/prefix/")
    u.set_defaults(func=cmd_put)
