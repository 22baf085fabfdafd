"""`python -m serving`: the ONNX sampler over HTTP, the same command as `nvae serve` (which delegates here),
runnable from the slim serving image, which holds `serving` and `common` only."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from common.argtypes import int_in, positive_int, seconds
from common.errors import NVAEError

TOKEN_ENV = "NVAE_SERVE_TOKEN"

DESCRIPTION = (
    "KServe/Triton-compatible v2 endpoints: /v2/health/{live,ready}, /v2/models/<name>[/ready], "
    "/v2/models/<name>/infer with inputs n (INT64), temperature (FP32), seed (INT64, optional); "
    "Prometheus metrics at /metrics."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx", required=True, help="file written by `nvae export-onnx`")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 in a container)")
    p.add_argument("--port", type=int_in("--port", 0, 65535), default=8080)
    p.add_argument("--model-name", default="nvae-decoder")
    p.add_argument(
        "--server",
        choices=("builtin", "kserve"),
        default="builtin",
        help="builtin: this package's server, which keeps every limit itself (authentication, slow-client "
        "deadlines, body size); kserve: a kserve.Model on kserve.ModelServer (REST and gRPC v2) for KServe "
        "clusters, where the mesh in front of the predictor authenticates and holds slow clients",
    )
    p.add_argument(
        "--grpc-port",
        type=int_in("--grpc-port", 1, 65535),
        help="with --server kserve: also serve OIP v2 over gRPC on this port (KServe's default: 8081)",
    )
    p.add_argument(
        "--providers",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="onnxruntime execution providers; with cuda, a CUDA provider that fails to load is an error",
    )
    p.add_argument(
        "--allow-cpu-fallback", action="store_true", help="with --providers cuda: run on CPU if CUDA fails"
    )
    p.add_argument(
        "--ort-cache",
        metavar="DIR",
        help="cache onnxruntime's optimised graph here (keyed by the decoder, providers, onnxruntime version "
        "and CPU), so a restart skips graph optimisation; default: no cache",
    )
    p.add_argument("--max-images", type=positive_int("--max-images"), default=256, help="images per request")
    p.add_argument(
        "--max-batch", type=positive_int("--max-batch"), default=64, help="images per onnxruntime run"
    )
    p.add_argument(
        "--timeout", type=seconds("--timeout"), default=30.0, help="seconds per request, queueing included"
    )
    p.add_argument(
        "--auth-token-file",
        help=f"file holding the bearer token that inference and metadata require (a mounted Secret); "
        f"default: ${TOKEN_ENV}, else no authentication. Health, readiness and /metrics stay open",
    )
    p.add_argument(
        "--header-timeout",
        type=seconds("--header-timeout"),
        default=10.0,
        help="seconds a connection may take to send a request's headers before it is dropped",
    )
    p.add_argument(
        "--body-timeout",
        type=seconds("--body-timeout"),
        default=10.0,
        help="seconds a request may take to send its body before it is answered 408",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=seconds("--shutdown-timeout"),
        default=10.0,
        help="on SIGTERM, seconds in-flight requests may take to finish before the server exits",
    )
    p.add_argument(
        "--max-concurrency",
        type=positive_int("--max-concurrency"),
        default=1,
        help="requests sampling at once",
    )
    p.add_argument(
        "--max-queue", type=int_in("--max-queue", 0), default=16, help="requests waiting before 429"
    )
    p.add_argument(
        "--batch-images",
        type=int_in("--batch-images", 0),
        default=0,
        help="request batching: waiting requests of one temperature share onnxruntime runs of up to this "
        "many images (0: off, one run per request)",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=int_in("--batch-wait-ms", 0, 1000),
        default=0,
        help="with batching, how long an idle server waits for more requests before running (default 0)",
    )


def read_token(args: argparse.Namespace) -> str | None:
    """The bearer token: --auth-token-file (a mounted Secret), else $NVAE_SERVE_TOKEN, else None (off)."""
    if args.auth_token_file:
        try:
            token = open(args.auth_token_file, encoding="utf-8").read().strip()  # noqa: SIM115
        except (OSError, UnicodeDecodeError) as exc:
            raise NVAEError(f"--auth-token-file {args.auth_token_file}: cannot read it ({exc})") from None
        if not token:
            raise NVAEError(f"--auth-token-file {args.auth_token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV, "").strip() or None


def run(args: argparse.Namespace) -> int:
    from serving.config import ServeConfig
    from serving.server import serve

    cfg = ServeConfig(
        model_name=args.model_name,
        max_images_per_request=args.max_images,
        max_batch=args.max_batch,
        timeout_s=args.timeout,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        batch_images=args.batch_images,
        batch_wait_s=args.batch_wait_ms / 1000,
        auth_token=read_token(args),
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        shutdown_timeout_s=args.shutdown_timeout,
        ort_cache_dir=args.ort_cache,
    )
    cfg.validate()  # before the model loads: a ConfigError names the field
    if args.server == "kserve":
        from serving.kserve_model import serve_kserve

        serve_kserve(args.onnx, args.port, args.grpc_port, cfg, args.providers, args.allow_cpu_fallback)
        return 0
    serve(
        args.onnx,
        host=args.host,
        port=args.port,
        cfg=cfg,
        providers=args.providers,
        allow_cpu_fallback=args.allow_cpu_fallback,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except NVAEError as exc:  # the `nvae` error contract: one line, exit 2
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
