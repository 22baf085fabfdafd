"""`nvae model publish|list|show|pull`: the model registry in the object store, a few lines over
`common.registry`. Exit status: 0 done, 2 bad input or a permanent failure (unknown version, missing file,
checksum mismatch, bad keys), 75 the store is unreachable or not ready: run again."""

from __future__ import annotations

import argparse
import json
import sys

from cli.store import exit_75_when_retryable
from common.files import atomic_write_json


def _registry(args: argparse.Namespace):
    from common.registry import Registry

    return Registry(args.registry)


def model_card(checkpoint: str, metrics: str | None, data_manifest: str | None, run_id: str | None) -> dict:
    """What a published version says about itself: recipe, training length, data, evaluation, BN readjustment
    and the run that made it."""
    from common.files import file_sha256
    from model.checkpoint import config_from_checkpoint, read_checkpoint

    payload = read_checkpoint(checkpoint)
    cfg = config_from_checkpoint(payload)
    card = {
        "dataset": cfg.dataset,
        "config": json.loads(cfg.to_json()),
        "steps": payload.get("step"),
        "bn_readjust_temperature": (payload.get("bn_readjust") or {}).get("temperature"),
        "run_id": run_id or None,
    }
    if metrics:
        from common.errors import DataError
        from common.schema import EvalMetrics, read_json

        m = read_json(metrics, EvalMetrics, DataError, "metrics file")
        card.update(nll_bpd=m.nll_bpd, iw_samples=m.iw_samples, eval_images=m.num_images)
    if data_manifest:
        card["data_manifest_sha256"] = file_sha256(data_manifest)
    return card


def _publish_nothing(manifest_out: str | None) -> int:
    """dvc.yaml's publish stage with publish.registry "" (no store): its out still says what happened."""
    if manifest_out:
        atomic_write_json(manifest_out, {"published": False, "reason": "no registry given"})
    print("no registry given: nothing published")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    if not args.registry and args.allow_empty_registry:
        return _publish_nothing(args.manifest_out)
    from inference.export import check_exported_from

    check_exported_from(args.onnx, args.checkpoint)  # a version is one model: its decoder and its weights
    files = {"decoder.onnx": args.onnx, "checkpoint.pt": args.checkpoint}
    if args.metrics:
        files["metrics.json"] = args.metrics
    card = model_card(args.checkpoint, args.metrics, args.data_manifest, args.run_id)
    manifest, created = _registry(args).publish(files, card)
    if args.manifest_out:
        atomic_write_json(args.manifest_out, manifest)
    state = "published" if created else "already published (same files)"
    print(f"{args.registry}/{manifest['version']}: {state}; latest -> {manifest['version']}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    versions = registry.list()
    latest = registry.resolve() if versions else None
    for m in versions:
        card = m.get("card", {})
        nll = card.get("nll_bpd")
        flag = "  (latest)" if m["version"] == latest else ""
        nll_text = f"{nll:.4f} bpd" if isinstance(nll, int | float) else "-"
        print(f"{m['version']}  {m.get('created', '')}  {card.get('dataset', '?')}  steps {card.get('steps')}  "
              f"NLL {nll_text}{flag}")  # fmt: skip
    if not versions:
        print(f"{args.registry}: no published versions")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    registry = _registry(args)
    manifest = registry.manifest(args.version) if args.no_verify else registry.verify(args.version)
    print(json.dumps(manifest, indent=2, sort_keys=True))
    if not args.no_verify:
        print(f"verified: {len(manifest['files'])} files match their sha256 in the store", file=sys.stderr)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    manifest = _registry(args).pull(args.out, args.version)
    print(
        f"pulled {args.registry}/{manifest['version']} -> {args.out} ({len(manifest['files'])} files verified)"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "model",
        help="the model registry in the object store: publish, list, show, pull",
        description="Versions live under s3://bucket/models/<name>/<version>/, content-addressed (sha256 of "
        "the files) and written once, with a manifest (checksums, model card) and a `latest` pointer. "
        "Endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.",
    )
    msub = p.add_subparsers(dest="model_command", metavar="ACTION")
    msub.required = True

    def add(name: str, func, help_text: str) -> argparse.ArgumentParser:
        q = msub.add_parser(name, help=help_text, description=help_text)
        q.add_argument("--registry", required=True, metavar="s3://BUCKET/models/NAME")
        q.set_defaults(func=exit_75_when_retryable(func))
        return q

    q = add("publish", cmd_publish, "publish an ONNX decoder with its checkpoint and metrics; moves `latest`")
    q.add_argument("--onnx", required=True, help="decoder from `nvae export-onnx`")
    q.add_argument("--checkpoint", required=True, help="the (BN-readjusted) checkpoint it was exported from")
    q.add_argument("--metrics", help="metrics.json from `nvae evaluate`")
    q.add_argument("--data-manifest", help="manifest.json of the prepared data (its sha256 goes in the card)")
    q.add_argument("--run-id", help="the pipeline run that made it (in the card)")
    q.add_argument("--manifest-out", help="also write the published version's manifest.json here")
    q.add_argument(
        "--allow-empty-registry",
        action="store_true",
        help='with --registry "": publish nothing and exit 0 (--manifest-out then says {"published": false})',
    )
    add("list", cmd_list, "list the published versions, oldest first")
    q = add(
        "show",
        cmd_show,
        "print a version's manifest (files, checksums, model card) after checking every file in the store "
        "against it",
    )
    q.add_argument("--version", default="latest")
    q.add_argument(
        "--no-verify",
        action="store_true",
        help="print the manifest without reading the files (verifying reads every byte of the version)",
    )
    q = add(
        "pull",
        cmd_pull,
        "download a version's files, each checked against its sha256; they move into --out only when all "
        "have passed, so a failed pull leaves --out as it was",
    )
    q.add_argument("--version", default="latest")
    q.add_argument(
        "--out", required=True, help="directory for decoder.onnx, checkpoint.pt, ... and manifest.json"
    )
