"""`nvae prepare` and `nvae data upload`: the command line over `data.prepare` and `data.remote`."""

from __future__ import annotations

import argparse

from common.argtypes import positive_int
from data.recipes import RECIPES
from data.sources import DEFAULT_MAX_FILE_MB, DEFAULT_MAX_PIXELS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `prepare` and `data upload` subcommands to the `nvae` parser."""
    datasets = "\n".join(f"  {name:<13} {r.description}" for name, r in RECIPES.items())
    p = subparsers.add_parser(
        "prepare",
        help="decode a raw dataset into uint8 arrays per split plus manifest.json (DALI)",
        description=(
            "Decode, crop, resize and bit-reduce a raw dataset with NVIDIA DALI (on the GPU when there is\n"
            "one, in DALI's CPU mode otherwise) into DIR/<split>.npy, uint8 (N, H, W, C), with\n"
            "DIR/manifest.json (counts, shape, bits, checksums, tool versions). Output is written to a\n"
            "temporary directory and renamed into place only when complete.\n\ndatasets:\n" + datasets
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--dataset",
        required=True,
        choices=list(RECIPES),
        metavar="NAME",
        help=f"dataset recipe: {', '.join(RECIPES)}",
    )
    p.add_argument(
        "--source",
        required=True,
        metavar="PATH",
        help="raw data: a directory (idx files, CIFAR batches, ImageNet TFRecords or npz batches, LSUN LMDBs, "
        "images), the CIFAR .tar.gz, OMNIGLOT's chardata.mat, or "
        "s3://bucket/prefix (endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)",
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output directory (must not exist, or be empty)"
    )
    _format_argument(p)
    p.add_argument(
        "--bits",
        type=int,
        choices=(8, 5),
        default=None,
        help="bits per channel to keep (default: the recipe's, 5 for celebahq256/ffhq256, else 8)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "gpu", "cpu"),
        default="auto",
        help="where DALI runs: auto (GPU if present), gpu, or cpu (default: auto)",
    )
    p.add_argument(
        "--size",
        type=int,
        default=None,
        metavar="N",
        help="stored side in pixels; required for image-folder (any) and LSUN (64, 128 or 256), fixed by the "
        "recipe otherwise",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="keep only the first N images of each split (smoke tests)",
    )
    p.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="skip images that cannot be decoded and list them in the manifest, instead of failing",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument(
        "--max-pixels",
        type=positive_int("--max-pixels"),
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse an image with more pixels than this (default {DEFAULT_MAX_PIXELS:,}); read from its header",
    )
    p.add_argument(
        "--max-file-mb",
        type=positive_int("--max-file-mb"),
        default=DEFAULT_MAX_FILE_MB,
        help=f"refuse a file larger than this, after decompression (default {DEFAULT_MAX_FILE_MB} MiB)",
    )
    p.set_defaults(func=cmd_prepare)

    d = subparsers.add_parser("data", help="raw datasets in the object store (upload for cluster runs)")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True
    u = dsub.add_parser(
        "upload",
        help="check a raw dataset, then upload its files to s3://bucket/prefix",
        description="Read the source with the dataset's recipe first (a wrong directory fails before "
        "anything is sent), then upload every file under it, keeping the relative layout. The pipeline's "
        "prepare step reads it back with --source s3://bucket/prefix. Endpoint and keys come from "
        "AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.",
    )
    u.add_argument("--dataset", required=True, choices=list(RECIPES), metavar="NAME", help="dataset recipe")
    u.add_argument("--source", required=True, metavar="DIR", help="directory with the raw files")
    u.add_argument("--to", required=True, metavar="S3_URI", help="e.g. s3://nvae/raw/fashion-mnist")
    _format_argument(u)
    u.set_defaults(func=cmd_upload)


def _format_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format",
        choices=("auto", *dict.fromkeys(f for r in RECIPES.values() for f in r.formats)),
        default="auto",
        help="imagenet32 only: tfrecord (the authors' data: van den Oord's downsampled ImageNet as Glow's "
        "TFRecords) or npz (Chrabaszcz et al.'s variant, downsampled differently); auto: whichever the source "
        "holds (default)",
    )


# `nvae prepare`'s options passed to `data.prepare.prepare` under their own names.
_PREPARE_OPTIONS = (
    "bits",
    "device",
    "skip_corrupt",
    "size",
    "limit",
    "overwrite",
    "max_pixels",
    "max_file_mb",
)


def cmd_prepare(args: argparse.Namespace) -> int:
    """Run `prepare` from parsed arguments; returns the exit code (errors are raised as DataError)."""
    from data.prepare import prepare

    options = {name: getattr(args, name) for name in _PREPARE_OPTIONS}
    prepare(args.dataset, args.source, args.out, source_format=args.format, **options)
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    from data.prepare import check_source
    from data.remote import upload_source

    check_source(args.dataset, args.source, args.format)
    objects = upload_source(args.source, args.to)
    total = sum(o["bytes"] for o in objects)
    print(f"uploaded {len(objects)} files ({total / 1e6:.1f} MB) to {args.to}")
    return 0
