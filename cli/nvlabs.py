"""`nvae import-nvlabs` and `nvae export-nvlabs`: the authors' checkpoint format, over `inference.nvlabs`."""

from __future__ import annotations

import argparse

from common.files import atomic_write_json


def cmd_import(args: argparse.Namespace) -> int:
    from inference.nvlabs import import_nvlabs_file

    done = import_nvlabs_file(args.checkpoint, args.out, args.data, weights_only=args.weights_only)
    if args.summary:
        atomic_write_json(args.summary, done)
    print(
        f"imported {done['dataset']}: {done['parameters']:,} parameters, {done['tensors']} tensors, epoch "
        f"{done['epoch']}, step {done['global_step']} (BN names: {done['bn_form']}"
        f"{', with its optimizer state' if done['training_state'] else ''}) -> {done['out']}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from inference.nvlabs import export_nvlabs_file

    done = export_nvlabs_file(args.checkpoint, args.out)
    print(f"exported as the authors' {done['dataset']} model: {done['tensors']} tensors -> {done['out']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-nvlabs",
        help="import a checkpoint of the authors' NVAE code (NVlabs/NVAE train.py) as ours",
        description="Read a checkpoint written by the authors' train.py (their released models included): the "
        "config from its args, every weight mapped by name, strictly (a missing, unexpected or misshapen "
        "tensor, or a flag this network cannot express, is an error and nothing is written). Loaded without "
        "running any code from the file. The result works with every command: evaluate, readjust-bn, sample, "
        "export-onnx, model publish; when the file holds their optimizer (as every checkpoint their train.py "
        "writes does), `nvae train --continue-from` goes on with their run from it.",
    )
    p.add_argument(
        "checkpoint",
        help="the authors' checkpoint.pt: a path, or s3://bucket/key (endpoint and keys from AWS_* variables)",
    )
    p.add_argument("--out", required=True, help="our checkpoint to write")
    p.add_argument("--data", help="a folder from `nvae prepare`: the model must be for its dataset")
    p.add_argument("--summary", help="also write what was imported here (JSON)")
    p.add_argument(
        "--weights-only",
        action="store_true",
        help="leave their optimizer state out (a third of the size, for evaluation and serving only)",
    )
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "export-nvlabs",
        help="write one of our checkpoints in the authors' format (for their evaluate.py)",
        description="The same network and weights as an authors' checkpoint (state_dict, args, arch_instance, "
        "epoch, global_step), which their evaluate.py reads; importing it back gives every tensor bit for bit.",
    )
    p.add_argument("--checkpoint", required=True, help="our checkpoint")
    p.add_argument("--out", required=True, help="the authors'-format file to write")
    p.set_defaults(func=cmd_export)
