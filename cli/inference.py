"""`nvae evaluate`, `readjust-bn`, `sample`, `nearest`, `plot-kl`, `export-onnx`, `fid-stats` and `fid`: a few
lines each over `inference` (and `serving.onnx_sampler` for `sample --onnx` and `fid --onnx`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.argtypes import int_in, positive_int, temperature

# Parsed options passed under their own names (the library's keyword arguments are named after the flags).
_EVALUATE_OPTIONS = (
    "split",
    "iw_samples",
    "chunk",
    "batch_size",
    "limit",
    "binarization",
    "seed",
    "kl_plot",
    "device",
)
_READJUST_OPTIONS = ("iters", "batch", "seed", "device")
_SAMPLE_OPTIONS = (
    "checkpoint",
    "onnx",
    "n",
    "seed",
    "decode",
    "reconstruct",
    "data",
    "fix_scales",
    "nrow",
    "device",
)
_EXPORT_OPTIONS = ("fp16", "opset", "decode", "exporter", "layout", "model_name", "max_batch_size")
_FID_OPTIONS = (
    "inception_sha256",
    "checkpoint",
    "onnx",
    "stats",
    "data",
    "n",
    "temperature",
    "readjust_iters",
    "readjust_batch",
    "batch_size",
    "seed",
    "device",
)
# The metadata `nvae export-onnx` prints.
_SHOWN_METADATA = (
    "nvae.preset",
    "nvae.decode",
    "nvae.precision",
    "nvae.bn_readjust_temperature",
    "nvae.checkpoint_sha256",
)


def _options(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    """The parsed values of `names`, as keyword arguments."""
    return {name: getattr(args, name) for name in names}


# ------------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from data.loaders import unverified
    from inference.evaluate import evaluate_checkpoint

    with unverified(args.no_verify):
        metrics = evaluate_checkpoint(
            args.checkpoint, args.data, args.out, **_options(args, _EVALUATE_OPTIONS)
        )
    print(
        f"{metrics['dataset']} {metrics['split']}: NLL {metrics['nll_bpd']:.4f} bits/dim (K={args.iw_samples}, "
        f"{metrics['num_images']} images), -ELBO {metrics['nelbo_bpd']:.4f} bits/dim, "
        f"{metrics['active_channels']}/{metrics['latent_channels']} active channels -> {Path(args.out)}"
    )
    return 0


# ------------------------------------------------------------------------------------------ readjust-bn
def cmd_readjust(args: argparse.Namespace) -> int:
    from inference.readjust import readjust_checkpoint

    settings = readjust_checkpoint(
        args.checkpoint, args.out, args.temperature, **_options(args, _READJUST_OPTIONS)
    )
    print(
        f"readjusted BN at t={args.temperature:g} ({args.iters} x {args.batch} samples, "
        f"{settings['seconds']:.1f} s) -> {args.out}"
    )
    return 0


# ---------------------------------------------------------------------------------------------- sample
def _open_onnx(path: str, providers: str):
    """`sample --onnx`'s decoder: serving's ONNX sampler (handed to the library, which lies below serving)."""
    from serving.onnx_sampler import OnnxSampler

    return OnnxSampler(path, providers)


def cmd_sample(args: argparse.Namespace) -> int:
    from inference.sample import sample_to_dir

    result = sample_to_dir(
        args.out, temperatures=args.temperature, open_onnx=_open_onnx, **_options(args, _SAMPLE_OPTIONS)
    )
    if result.providers is not None:
        print(f"onnxruntime providers: {', '.join(result.providers)}")
    print("wrote " + ", ".join(str(p) for p in result.written))
    return 0


# --------------------------------------------------------------------------------------------- nearest
def cmd_nearest(args: argparse.Namespace) -> int:
    from inference.sample import nearest_grid

    result = nearest_grid(args.samples, args.data, args.out, key=args.key, k=args.k, limit=args.limit)
    print(f"nearest training images for {result.samples} samples ({result.key}) -> {args.out}")
    return 0


def cmd_plot_kl(args: argparse.Namespace) -> int:
    from inference.evaluate import plot_kl_file

    plot_kl_file(args.metrics, args.out)
    print(f"KL per group -> {args.out}")
    return 0


# ----------------------------------------------------------------------------------------- export-onnx
def cmd_export_onnx(args: argparse.Namespace) -> int:
    from inference.export import export_onnx

    result = export_onnx(
        args.checkpoint, args.out, verify=not args.no_verify, **_options(args, _EXPORT_OPTIONS)
    )
    print("\n".join(_export_report(result)))
    return 0


def _export_report(result) -> list[str]:
    """The lines `nvae export-onnx` prints about an `ExportResult`: file, interface, metadata, parity."""
    lines = [f"onnx: {result.path} ({result.seconds:.1f} s, {result.metadata['nvae.exporter']})"]
    for kind, ports in (("input", result.inputs), ("output", result.outputs)):
        lines += [f"  {kind:6s} {name:18s} {shape}" for name, shape in ports.items()]
    if result.config is not None:
        lines.append(f"  triton config: {result.config}")
    lines.append("  metadata " + json.dumps({k: result.metadata[k] for k in _SHOWN_METADATA}))
    if result.max_abs_diff is not None:
        lines.append(
            f"  parity vs PyTorch (onnxruntime CPU, batch 2): max |diff| = {result.max_abs_diff:.2e}"
        )
    return lines


# ------------------------------------------------------------------------------------------ fid, fid-stats
def cmd_fid_stats(args: argparse.Namespace) -> int:
    from inference.checkpoints import default_device
    from inference.fid import dataset_statistics, load_inception

    net = load_inception(args.inception, args.inception_sha256, default_device(args.device))
    ref = dataset_statistics(
        args.data, net, out=args.out, max_images=args.max_images, batch_size=args.batch_size, seed=args.seed
    )
    print(f"FID statistics of {ref.describe()}: {'reused' if ref.reused else 'written'} {ref.path}")
    return 0


def cmd_fid(args: argparse.Namespace) -> int:
    from inference.fid import fid_to_file

    m = fid_to_file(
        args.out, inception=args.inception, open_onnx=_open_onnx, readjust=args.readjust_bn,
        **_options(args, _FID_OPTIONS),
    )  # fmt: skip
    if m["fid"] is None:
        print(f"FID not computed (--n 0) -> {args.out}")
        return 0
    bn = f"BN readjusted at t={m['fid_bn_temperature']:g}" if m["fid_bn_readjusted"] else "training BN"
    ref = m["fid_reference"]
    print(f"FID {m['fid']:.3f} ({m['fid_samples']} samples at t={m['fid_temperature']:g}, {bn}; against "
          f"{ref['dataset']}, {ref['images']} images; {m['fid_images_per_s']:.1f} img/s) -> {args.out}")  # fmt: skip
    return 0


def _inception_options(p: argparse.ArgumentParser) -> None:
    from inference.fid import WEIGHTS_NAME, WEIGHTS_SHA256, WEIGHTS_URL

    p.add_argument(
        "--inception",
        required=True,
        metavar="WEIGHTS",
        help=f"pytorch-fid's Inception weights {WEIGHTS_NAME} (from {WEIGHTS_URL}): a path, or s3://bucket/key "
        "(endpoint and keys from AWS_* variables; kept in the cache after the first download); never "
        "downloaded from the internet",
    )
    p.add_argument(
        "--inception-sha256",
        default=WEIGHTS_SHA256,
        metavar="HEX",
        help="the weights' expected SHA-256 (default: pytorch-fid's file); statistics record it, and FID "
        "refuses statistics of other weights",
    )
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")


def register(sub: argparse._SubParsersAction) -> None:
    from inference.export import DECODE_MODES, DEFAULT_OPSET, EXPORTERS
    from inference.triton import LAYOUTS

    p = sub.add_parser(
        "evaluate",
        help="importance-weighted NLL (bits/dim), ELBO, KL per group, active channels",
        description="Evaluate a checkpoint on a prepared split with the importance-weighted bound of K samples "
        "per image (K=1000 for reported numbers), computed in chunks of samples per pass.",
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="directory written by `nvae prepare`")
    p.add_argument(
        "--split",
        help="split to evaluate (default: the one the authors report on: valid for celeba64, test otherwise)",
    )
    p.add_argument("--iw-samples", type=positive_int("--iw-samples"), default=1000, help="K (default 1000)")
    p.add_argument(
        "--chunk",
        type=positive_int("--chunk"),
        help="samples per pass (default: about 256 images per pass on CUDA, 64 on CPU); a pass that would need "
        "more memory than is free (measured first) is refused before the work; the results do not depend on it",
    )
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=16, help="images per batch")
    p.add_argument("--limit", type=positive_int("--limit"), help="evaluate only the first N images")
    p.add_argument(
        "--binarization",
        choices=("fixed", "dynamic"),
        default="fixed",
        help="binarized datasets: fixed-seed test set (default) or the released dynamic protocol",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-verify", action="store_true", help="skip the check of the split against the manifest's SHA-256"
    )
    p.add_argument("--out", required=True, help="metrics JSON (what DVC metrics and KFP Metrics read)")
    p.add_argument("--kl-plot", help="also write the KL-per-group bar plot here (PNG)")
    p.add_argument("--device")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "readjust-bn",
        help="re-estimate decoder BN statistics from prior samples at a temperature",
        description="Put the sampling path's BN layers in train mode, draw --iters batches of --batch prior "
        "samples at --temperature, and save a checkpoint that records the settings.",
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--temperature", type=temperature, required=True)
    p.add_argument("--iters", type=positive_int("--iters"), default=500)
    p.add_argument("--batch", type=positive_int("--batch"), default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the readjusted checkpoint")
    p.add_argument("--device")
    p.set_defaults(func=cmd_readjust)

    p = sub.add_parser(
        "sample",
        help="sample images (PNG grid + .npz) from a checkpoint or an ONNX decoder",
        description="Draw --n images per temperature from the prior; the same seed gives the same images, "
        "with --checkpoint or --onnx alike.",
    )
    p.add_argument("--checkpoint")
    p.add_argument("--onnx", help="ONNX decoder from `nvae export-onnx`")
    p.add_argument("--n", type=positive_int("--n"), default=64)
    p.add_argument(
        "--temperature", type=temperature, nargs="+", default=[1.0], help="one or more, e.g. 0.6 0.8 1"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--decode",
        choices=("mean", "sample"),
        default="mean",
        help="image from the pixel distribution: its mean (default: smooth images, no pixel noise) or "
        "sample: a draw at temperature 1, the authors' sample mode (--temperature scales the latents only)",
    )
    p.add_argument(
        "--reconstruct", action="store_true", help="also inputs beside reconstructions (needs --data)"
    )
    p.add_argument("--data", help="prepared dataset for --reconstruct")
    p.add_argument(
        "--fix-scales",
        action="store_true",
        help="also a grid whose row k holds the top k scales fixed and resamples the rest",
    )
    p.add_argument("--nrow", type=positive_int("--nrow"), help="images per grid row")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--device",
        help="cpu or cuda (default: cuda when available); with --onnx, cuda requires onnxruntime's CUDA "
        "provider to load",
    )
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "nearest",
        help="closest training images to each sample (memorisation check)",
        description="L2 distance after the paper's downsample-and-center-crop (App. B.1).",
    )
    p.add_argument("--samples", required=True, help="samples.npz from `nvae sample`")
    p.add_argument("--key", help="array in the .npz (default: the first images_t*)")
    p.add_argument("--data", required=True)
    p.add_argument("--k", type=positive_int("--k"), default=5)
    p.add_argument("--limit", type=positive_int("--limit"), default=8, help="samples to show")
    p.add_argument("--out", required=True, help="PNG: each row a sample and its k nearest")
    p.set_defaults(func=cmd_nearest)

    p = sub.add_parser("plot-kl", help="bar plot of KL per latent group from a metrics file (Fig. 5b)")
    p.add_argument("--metrics", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_plot_kl)

    p = sub.add_parser(
        "export-onnx",
        help="export the decoder (generative path) of a checkpoint to ONNX",
        description="Export learned h, prior heads, decoder tower, postprocess and the pixel distribution's "
        "mean (or a sample) with the checkpoint's BN statistics baked in. Inputs: eps_0..eps_{G-1} "
        "(standard-normal noise per group, coarse first), temperature (1,); dynamic batch. Outputs: "
        "images and images_continuous (B, C, D, D) in [0, 1].",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint (ideally BN-readjusted)")
    p.add_argument(
        "--out", required=True, help="ONNX file to write (--layout triton: the model repository folder)"
    )
    p.add_argument(
        "--layout",
        default="file",
        choices=LAYOUTS,
        help="file: one ONNX file (default); triton: a Triton model repository, OUT/NAME/1/model.onnx with "
        "a per-image temperature (batch, 1) and OUT/NAME/config.pbtxt, for Triton, KServe's ONNX runtime "
        "or OpenVINO Model Server",
    )
    p.add_argument(
        "--model-name", default="nvae-decoder", help="--layout triton: the model's folder and name"
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=64,
        help="--layout triton: images Triton batches into one run (default 64; 0: no batching by Triton)",
    )
    p.add_argument("--fp16", action="store_true", help="run the network in half precision (I/O stays fp32)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument(
        "--decode",
        default="mean",
        choices=DECODE_MODES,
        help="image from the pixel distribution: its mean (default) or sample, a draw at temperature 1 as "
        "the authors' sample mode (the temperature input scales the latents only)",
    )
    p.add_argument(
        "--exporter",
        default="dynamo",
        choices=EXPORTERS,
        help="torch.onnx.export(dynamo=True) (default) or the legacy TorchScript tracer (faster to export)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime-vs-PyTorch check")
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser(
        "fid-stats",
        help="FID reference statistics of a prepared dataset (Inception pool features: mean, covariance)",
        description="Compute the mean and covariance of the FID Inception features of a prepared dataset's "
        "training images (and test images too for celebahq256 and omniglot, as the authors), up to --max-images "
        "of them, not binarized. The file records the dataset's SHA-256, the weights' SHA-256 and the count; "
        "asked again for the same, it is reused.",
    )
    p.add_argument("--data", required=True, help="directory written by `nvae prepare`")
    _inception_options(p)
    p.add_argument(
        "--max-images",
        type=positive_int("--max-images"),
        default=50_000,
        help="images to use (default 50000, the authors'); a seeded subset when the splits hold more",
    )
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=50)
    p.add_argument("--seed", type=int, default=0, help="picks the subset when --max-images is smaller")
    p.add_argument(
        "--out",
        help="statistics file (.npz; default: in $XDG_CACHE_HOME/nvae/fid, ~/.cache/nvae/fid)",
    )
    p.set_defaults(func=cmd_fid_stats)

    p = sub.add_parser(
        "fid",
        help="FID of samples from a checkpoint or an ONNX decoder, against a dataset's statistics",
        description="Draw --n samples at --temperature (the mean image of the pixel distribution, as the "
        "authors' evaluate_fid does), optionally after BN readjustment at that temperature, and compute their "
        "FID against statistics from `nvae fid-stats` (--stats) or of a prepared dataset (--data: computed "
        "once and cached). Statistics of another dataset or of other Inception weights are refused.",
    )
    p.add_argument("--checkpoint")
    p.add_argument("--onnx", help="ONNX decoder from `nvae export-onnx` (decode=mean)")
    p.add_argument("--stats", help="statistics file from `nvae fid-stats`")
    p.add_argument("--data", help="prepared dataset: its statistics (cached), and a check of --stats")
    _inception_options(p)
    p.add_argument(
        "--n",
        type=int_in("--n", 0),
        default=50_000,
        help="samples (default 50000, the authors'); 0 writes a record that FID was not computed",
    )
    p.add_argument("--temperature", type=temperature, default=1.0)
    p.add_argument(
        "--readjust-bn",
        action="store_true",
        help="re-estimate BN statistics at --temperature first (checkpoints only; an ONNX decoder has its own)",
    )
    p.add_argument("--readjust-iters", type=positive_int("--readjust-iters"), default=500)
    p.add_argument("--readjust-batch", type=positive_int("--readjust-batch"), default=2)
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=100, help="samples per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="metrics JSON (fid, samples, temperature, BN readjustment)")
    p.set_defaults(func=cmd_fid)
