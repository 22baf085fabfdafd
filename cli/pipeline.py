"""`nvae pipeline compile | run --local | submit`."""

from __future__ import annotations

import argparse
import json

from model.config import parse_set_args


def _params(args):
    from components.params import PipelineParams

    return PipelineParams.from_overrides(parse_set_args(args.set))


def cmd_compile(args: argparse.Namespace) -> int:
    from pipelines.nvae_pipeline import compile_pipeline

    print(f"pipeline spec -> {compile_pipeline(args.out)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.nvae_pipeline import run_local

    if not args.local:
        raise ValueError("only --local runs here; use `nvae pipeline submit --host URL` for a cluster")
    found = run_local(_params(args), args.root)
    print("local pipeline run finished; results:")
    for key, path in found.items():
        print(f"  {key:12s} {path}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines.nvae_pipeline import submit

    result = submit(args.host, _params(args), args.experiment, args.run_name, args.package)
    run_id = getattr(result, "run_id", None)
    print(json.dumps({"run_id": run_id, "host": args.host, "experiment": args.experiment}))
    return 0


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
        "--local", action="store_true", required=True, help="execute with kfp.local (SubprocessRunner)"
    )
    r.add_argument("--root", default="runs/pipeline", help="where the local artifacts go")
    add_set(r)
    r.set_defaults(func=cmd_run)

    s = psub.add_parser("submit", help="upload and start a run on a Kubeflow Pipelines endpoint")
    s.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    s.add_argument("--experiment", default="nvae")
    s.add_argument("--run-name")
    s.add_argument("--package", default="pipelines/nvae_pipeline.yaml", help="compiled spec to upload")
    add_set(s)
    s.set_defaults(func=cmd_submit)
