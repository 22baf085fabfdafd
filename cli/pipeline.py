"""`nvae pipeline compile | run --local | submit`."""

from __future__ import annotations

import argparse
import json
import sys

from common.errors import ConfigError
from model.config import parse_set_args


def _params(args, local_source: bool = False):
    from components.params import LOCAL_SOURCE, PipelineParams

    values = parse_set_args(args.set)
    if local_source and "source" not in values:
        # The subprocess runner reads this machine's files: the embedded Fashion-MNIST, not the store.
        values["source"] = LOCAL_SOURCE
    if local_source and "checkpoint_store" not in values:
        values["checkpoint_store"] = ""  # ... and keeps its checkpoints with the run's outputs
    return PipelineParams.from_overrides(values)


def _images(args):
    from components.images import DEFAULT_REGISTRY, Images

    digests = tuple(tuple(d.partition("=")[::2]) for d in args.image_digest)
    return Images(args.image_registry or DEFAULT_REGISTRY, args.image_tag, digests)


DEFAULT_IMAGES_NOTE = (
    "nvae pipeline compile: note: without --image-registry the spec names the default images ({cpu}, {gpu}); "
    "build and push your own (scripts/images.sh --registry R, then --image-registry R) or take a release's "
    "images and its compiled spec"
)


def cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.nvae_pipeline import compile_pipeline

    images = _images(args)
    print(f"pipeline spec -> {compile_pipeline(args.out, images)}")
    if args.image_registry is None:
        print(DEFAULT_IMAGES_NOTE.format(cpu=images.cpu, gpu=images.gpu), file=sys.stderr)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.nvae_pipeline import run_local

    if not args.local:
        raise ConfigError("only --local runs here; use `nvae pipeline submit --host URL` for a cluster")
    params = _params(args, local_source=args.runner == "subprocess")
    print(f"source: {params.source}  (runner: {args.runner})", flush=True)
    if params.checkpoint_store:
        print(f"checkpoints: {params.checkpoint_store}/<run id>/checkpoints", flush=True)
    found = run_local(params, args.root, _images(args), args.runner)
    print("local pipeline run finished; results:")
    for key, path in found.items():
        print(f"  {key:12s} {path}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.nvae_pipeline import submit

    run = submit(
        args.host,
        _params(args),
        args.experiment,
        args.run_name,
        args.package,
        _images(args),
        namespace=args.namespace,
        token_file=args.token_file,
    )
    print(f"run {run['run_id']} started: {run['url']}", file=sys.stderr)
    print(json.dumps({**run, "host": args.host, "experiment": args.experiment, "namespace": args.namespace}))
    return 0


def add_images(q: argparse.ArgumentParser) -> None:
    from components.images import DEFAULT_REGISTRY, DEFAULT_TAG

    q.add_argument(
        "--image-registry",
        default=None,
        help=f"registry the nvae-cpu/nvae-gpu images are pulled from (default {DEFAULT_REGISTRY})",
    )
    q.add_argument("--image-tag", default=DEFAULT_TAG, help=f"their tag (default {DEFAULT_TAG})")
    q.add_argument(
        "--image-digest",
        action="append",
        default=[],
        metavar="KIND=sha256:HEX",
        help="pin an image (cpu, gpu) to the digest it was pushed with: REGISTRY/nvae-KIND:TAG@sha256:HEX",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline",
        help="compile, run locally, or submit the Kubeflow pipeline",
        description="The Kubeflow pipeline: prepare -> train -> evaluate / readjust BN -> export "
        "ONNX -> sample. Parameters are set with --set key=value and validated before any step.",
    )
    psub = p.add_subparsers(dest="pipeline_command", metavar="ACTION")
    psub.required = True

    c = psub.add_parser("compile", help="write the pipeline spec YAML")
    c.add_argument("--out", default="pipelines/nvae_pipeline.yaml")
    add_images(c)
    c.set_defaults(func=cmd_compile)

    def add_set(q):
        q.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="pipeline parameter (repeatable), e.g. --set steps=500 --set temperature=0.7",
        )

    r = psub.add_parser("run", help="run the pipeline on this machine with kfp.local")
    r.add_argument(
        "--local", action="store_true", required=True, help="execute with kfp.local on this machine"
    )
    r.add_argument("--root", default="runs/pipeline", help="where the local artifacts go")
    r.add_argument(
        "--runner",
        choices=("subprocess", "docker"),
        default="subprocess",
        help="subprocess: every step in this Python (fast, no images; source defaults to the embedded "
        "Fashion-MNIST and checkpoint_store to none); docker: every step in its image as on a cluster, via DOCKER_HOST (podman works)",
    )
    add_images(r)
    add_set(r)
    r.set_defaults(func=cmd_run)

    s = psub.add_parser("submit", help="upload and start a run on a Kubeflow Pipelines endpoint")
    s.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    s.add_argument("--experiment", default="nvae", help="experiment to file the run under (created if new)")
    s.add_argument(
        "--run-name", help="the run's name in the UI (default: the pipeline's name and a timestamp)"
    )
    s.add_argument("--namespace", help="Kubeflow profile namespace (multi-user Kubeflow)")
    s.add_argument(
        "--token-file",
        help="file with a bearer token for the KFP API (default: the in-cluster service-account token, if "
        "mounted)",
    )
    s.add_argument(
        "--package",
        default="pipelines/nvae_pipeline.yaml",
        help="compiled spec to upload (recompiled when other images are given)",
    )
    add_images(s)
    add_set(s)
    s.set_defaults(func=cmd_submit)
