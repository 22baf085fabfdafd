"""`nvae export-onnx` and `nvae serve`: a few lines each over `model.export` and `model.serve`."""

from __future__ import annotations

import argparse
import json
import logging

log = logging.getLogger(__name__)


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from model.export import export_onnx

    result = export_onnx(
        args.checkpoint,
        args.out,
        fp16=args.fp16,
        opset=args.opset,
        decode=args.decode,
        exporter=args.exporter,
        verify=not args.no_verify,
    )
    print(f"onnx: {result.path} ({result.seconds:.1f} s, {result.metadata['nvae.exporter']})")
    for kind, io in (("input", result.inputs), ("output", result.outputs)):
        for name, shape in io.items():
            print(f"  {kind:6s} {name:18s} {shape}")
    keys = (
        "nvae.preset",
        "nvae.decode",
        "nvae.precision",
        "nvae.bn_readjust_temperature",
        "nvae.checkpoint_sha256",
    )
    print("  metadata " + json.dumps({k: result.metadata[k] for k in keys}))
    if result.max_abs_diff is not None:
        print(f"  parity vs PyTorch (onnxruntime CPU, batch 2): max |diff| = {result.max_abs_diff:.2e}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from model.serve import ServeConfig, serve

    cfg = ServeConfig(
        model_name=args.model_name,
        max_images_per_request=args.max_images,
        max_batch=args.max_batch,
        timeout_s=args.timeout,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
    )
    serve(args.onnx, host=args.host, port=args.port, cfg=cfg, providers=args.providers)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from model.export import DECODE_MODES, DEFAULT_OPSET, EXPORTERS

    p = sub.add_parser(
        "export-onnx",
        help="export the decoder (generative path) of a checkpoint to ONNX",
        description="Export learned h, prior heads, decoder tower, postprocess and the pixel distribution's "
        "mean (or a sample) with the checkpoint's BN statistics baked in. Inputs: eps_0..eps_{G-1} "
        "(standard-normal noise per group, coarse first), temperature (1,); dynamic batch. Outputs: "
        "images and images_continuous (B, C, D, D) in [0, 1].",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint (ideally BN-readjusted)")
    p.add_argument("--out", required=True, help="ONNX file to write")
    p.add_argument("--fp16", action="store_true", help="run the network in half precision (I/O stays fp32)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--decode", default="mean", choices=DECODE_MODES, help="pixel distribution mean or sample")
    p.add_argument(
        "--exporter",
        default="dynamo",
        choices=EXPORTERS,
        help="torch.onnx.export(dynamo=True) (default) or the legacy TorchScript tracer (faster to export)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-PyTorch check")
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser(
        "serve",
        help="serve an exported decoder over HTTP (Open Inference Protocol v2)",
        description="KServe/Triton-compatible v2 endpoints: /v2/health/{live,ready}, /v2/models/<name>[/ready], "
        "/v2/models/<name>/infer with inputs n (INT64), temperature (FP32), seed (INT64, optional); "
        "Prometheus metrics at /metrics.",
    )
    p.add_argument("--onnx", required=True, help="file written by `nvae export-onnx`")
    p.add_argument("--host", default="127.0.0.1", help="bind address (0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--model-name", default="nvae-decoder")
    p.add_argument("--providers", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--max-images", type=int, default=256, help="images per request")
    p.add_argument("--max-batch", type=int, default=64, help="images per onnxruntime run")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request, queueing included")
    p.add_argument("--max-concurrency", type=int, default=1, help="requests sampling at once")
    p.add_argument("--max-queue", type=int, default=16, help="requests waiting before 429")
    p.set_defaults(func=cmd_serve)
