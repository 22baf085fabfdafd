"""`nvae evaluate`, `readjust-bn`, `sample`, `nearest`, `plot-kl` and `export-onnx`: a few lines each over
`inference` (and `serving.onnx_sampler` for `sample --onnx`)."""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
from pathlib import Path

import numpy as np

from common.argtypes import positive_int, temperature
from common.errors import NVAEError

log = logging.getLogger(__name__)


def _device(arg: str | None) -> str:
    import torch

    return arg or ("cuda" if torch.cuda.is_available() else "cpu")


def _load(checkpoint: str, device: str):
    import torch

    from model.checkpoint import load_model
    from model.precision import configure_cpu

    if device == "cpu":
        configure_cpu()  # denormals flushed, malloc arena kept: as in training
    model, payload = load_model(checkpoint, map_location=device)
    model.eval()
    if device == "cpu":  # NHWC: IW evaluation of fmnist-cpu measured 1.3-1.8x faster than NCHW
        model = model.to(memory_format=torch.channels_last)
    return model, payload


def _check_data(model, data_dir: str) -> dict:
    from data.loaders import read_manifest

    manifest = read_manifest(data_dir)
    if manifest["dataset"] != model.cfg.dataset:
        raise NVAEError(
            f"--data {data_dir} holds {manifest['dataset']!r} but the checkpoint's model is for {model.cfg.dataset!r}"
        )
    return manifest


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


# ------------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from common.files import file_sha256
    from data.loaders import EVAL_BINARIZE_SEED, make_loader
    from inference.evaluate import evaluate, plot_kl_per_group

    device = _device(args.device)
    model, payload = _load(args.checkpoint, device)
    _check_data(model, args.data)  # before any long work
    cfg = model.cfg
    if args.split is None:
        from data.recipes import default_eval_split

        args.split = default_eval_split(cfg.dataset)
    dynamic = cfg.binarize and args.binarization == "dynamic"
    loader = make_loader(
        args.data,
        args.split,
        args.batch_size,
        train=dynamic,
        seed=args.seed,
        flip=False,
        drop_last=False,
        binarize=cfg.binarize,
        device=device,
    )
    n_total = len(loader.dataset) if hasattr(loader, "dataset") else None
    metrics = evaluate(model, loader, args.iw_samples, args.chunk, args.seed, total=n_total, limit=args.limit)
    if not cfg.binarize:
        binarization = "n/a (not a binarized dataset)"
    elif dynamic:
        binarization = f"dynamic (released protocol), seed {args.seed}"
    else:
        binarization = f"fixed-seed ({EVAL_BINARIZE_SEED})"
    metrics.update(
        {
            "dataset": cfg.dataset,
            "split": args.split,
            "binarization": binarization,
            "checkpoint": str(args.checkpoint),
            "checkpoint_sha256": file_sha256(args.checkpoint),
            "train_step": payload.get("step"),
        }
    )
    out = Path(args.out)
    bad = [k for k in ("nll_bpd", "nelbo_bpd", "kl_nats") if not math.isfinite(metrics[k])]
    if bad:  # NaN is not JSON, and a metrics file holding it would look like a result
        raise NVAEError(
            f"{args.checkpoint}: non-finite {', '.join(bad)} (NaN or inf weights?); nothing written"
        )
    _atomic_write_text(out, json.dumps(metrics, indent=2, sort_keys=True, allow_nan=False) + "\n")
    if args.kl_plot:
        plot_kl_per_group(metrics, args.kl_plot)
    print(
        f"{cfg.dataset} {args.split}: NLL {metrics['nll_bpd']:.4f} bits/dim (K={args.iw_samples}, "
        f"{metrics['num_images']} images), -ELBO {metrics['nelbo_bpd']:.4f} bits/dim, "
        f"{metrics['active_channels']}/{metrics['latent_channels']} active channels -> {out}"
    )
    return 0


# ------------------------------------------------------------------------------------------ readjust-bn
def cmd_readjust(args: argparse.Namespace) -> int:
    from common.files import file_sha256
    from inference.readjust import readjust_bn
    from model.checkpoint import save_checkpoint

    model, payload = _load(args.checkpoint, _device(args.device))
    settings = readjust_bn(model, args.temperature, args.iters, args.batch, args.seed)
    settings["source_checkpoint_sha256"] = file_sha256(args.checkpoint)
    save_checkpoint(args.out, model, extra={"bn_readjust": settings, "step": payload.get("step", 0)})
    print(
        f"readjusted BN at t={args.temperature:g} ({args.iters} x {args.batch} samples, "
        f"{settings['seconds']:.1f} s) -> {args.out}"
    )
    return 0


# ---------------------------------------------------------------------------------------------- sample
def _to_uint8(images) -> np.ndarray:
    """(B, C, H, W) float in [0, 1] (tensor or array) -> (B, H, W, C) uint8."""
    arr = np.asarray(images, dtype=np.float32)
    return (np.clip(arr, 0, 1).transpose(0, 2, 3, 1) * 255 + 0.5).astype(np.uint8)


MAX_SAMPLE_BYTES = 2 << 30  # float32 images held at once by one `nvae sample` call


def _check_sample_count(n: int, image_shape: tuple[int, ...]) -> None:
    per_image = 4 * math.prod(image_shape)
    most = MAX_SAMPLE_BYTES // per_image
    if n > most:
        raise NVAEError(
            f"--n {n} would hold {n * per_image / 2**30:.1f} GiB of {tuple(image_shape)} images; at most {most} "
            "per call (run several with different --seed)"
        )


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from data.images import image_grid, save_png
    from inference.sample import fixed_scale_rows, reconstructions
    from model.prior_sampling import sample_images

    if bool(args.checkpoint) == bool(args.onnx):
        raise NVAEError("give exactly one of --checkpoint or --onnx")
    if (args.reconstruct or args.fix_scales) and not args.checkpoint:
        raise NVAEError("--reconstruct and --fix-scales need --checkpoint")
    if args.reconstruct and not args.data:
        raise NVAEError("--reconstruct needs --data (a prepared dataset)")
    out = Path(args.out)
    arrays: dict[str, np.ndarray] = {"temperatures": np.asarray(args.temperature, dtype=np.float32)}
    written = []
    if args.onnx:
        from serving.onnx_sampler import OnnxSampler

        # --device picks the provider: cuda must load (no silent CPU run), cpu, or none: CUDA if it loads
        sampler = OnnxSampler(args.onnx, {"cuda": "cuda", "cpu": "cpu"}.get(args.device or "", "auto"))
        if args.decode and args.decode != sampler.decode:
            raise NVAEError(
                f"{args.onnx} was exported with decode={sampler.decode}; re-export with "
                f"`nvae export-onnx --decode {args.decode}`"
            )
        _check_sample_count(args.n, sampler.image_shape)
        print(f"onnxruntime providers: {', '.join(sampler.providers)}")
        draw = lambda t: torch.as_tensor(sampler.sample(args.n, t, args.seed))  # noqa: E731
    else:
        model, payload = _load(args.checkpoint, _device(args.device))
        _check_sample_count(args.n, (model.cfg.in_channels, model.cfg.data_size, model.cfg.data_size))
        readjusted = (payload.get("bn_readjust") or {}).get("temperature")
        for t in args.temperature:
            if readjusted is None:
                log.warning(
                    "BN statistics are the training averages; `nvae readjust-bn` gives better samples"
                )
                break
            if abs(readjusted - t) > 1e-6:
                log.warning("BN was readjusted at t=%g but sampling at t=%g", readjusted, t)
        decode = args.decode or "mean"
        draw = lambda t: sample_images(model, args.n, t, args.seed, decode=decode)  # noqa: E731
    for t in args.temperature:
        images = draw(t)
        arrays[f"images_t{t:g}"] = _to_uint8(images)
        path = out / f"grid_t{t:g}.png"
        save_png(image_grid(torch.as_tensor(images), nrow=args.nrow), path)
        written.append(path)
        if args.fix_scales:
            rows = fixed_scale_rows(model, args.nrow or 8, t, args.seed, decode)
            path = out / f"fixed_scales_t{t:g}.png"
            save_png(image_grid(rows, nrow=args.nrow or 8), path)
            written.append(path)
    if args.reconstruct:
        from data.loaders import make_loader

        _check_data(model, args.data)
        loader = make_loader(
            args.data, "test", args.n, train=False, flip=False, drop_last=False, binarize=model.cfg.binarize
        )
        x = next(iter(loader)).to(model.h.device)
        rec = reconstructions(model, x, args.seed)
        nrow = args.nrow or 8
        rows = []
        for i in range(0, x.size(0), nrow):  # input row, then its reconstruction row
            rows += [x[i : i + nrow].cpu(), rec[i : i + nrow]]
        save_png(image_grid(torch.cat(rows), nrow=nrow), out / "reconstructions.png")
        written.append(out / "reconstructions.png")
        arrays["inputs"], arrays["reconstructions"] = _to_uint8(x.cpu()), _to_uint8(rec)
    _atomic_savez(out / "samples.npz", **arrays)
    written.append(out / "samples.npz")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


# --------------------------------------------------------------------------------------------- nearest
def cmd_nearest(args: argparse.Namespace) -> int:
    import torch

    from data.images import image_grid, save_png
    from data.loaders import load_split, read_manifest
    from inference.sample import nearest_neighbours

    try:
        with np.load(args.samples) as npz:
            keys = [k for k in npz.files if k.startswith("images_")]
            key = args.key or (keys[0] if keys else None)
            if key not in npz.files:
                raise NVAEError(f"{args.samples}: no array {key!r} (has: {', '.join(npz.files)})")
            samples = npz[key][: args.limit]
    except (OSError, ValueError) as exc:
        raise NVAEError(f"{args.samples}: not a readable samples .npz ({exc})") from None
    manifest = read_manifest(args.data)
    train = load_split(args.data, "train")
    if train.shape[1:] != samples.shape[1:]:
        raise NVAEError(
            f"samples are {samples.shape[1:]} but {args.data} ({manifest['dataset']}) holds "
            f"{train.shape[1:]} images"
        )
    idx = nearest_neighbours(samples, train, k=args.k)
    tiles = []
    for s, row in zip(samples, idx, strict=True):
        tiles.append(s)
        tiles.extend(train[i] for i in row)
    arr = torch.as_tensor(np.stack(tiles)).permute(0, 3, 1, 2).float() / 255
    save_png(image_grid(arr, nrow=args.k + 1), args.out)
    print(f"nearest training images for {len(samples)} samples ({key}) -> {args.out}")
    return 0


def cmd_plot_kl(args: argparse.Namespace) -> int:
    from inference.evaluate import plot_kl_per_group

    try:
        metrics = json.loads(Path(args.metrics).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise NVAEError(f"{args.metrics}: not a readable metrics file ({exc})") from None
    if "kl_per_group" not in metrics:
        raise NVAEError(f"{args.metrics}: no kl_per_group field (is it from `nvae evaluate`?)")
    plot_kl_per_group(metrics, args.out)
    print(f"KL per group -> {args.out}")
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from inference.export import export_onnx

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
    for kind, ports in (("input", result.inputs), ("output", result.outputs)):
        for name, shape in ports.items():
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


def register(sub: argparse._SubParsersAction) -> None:
    from inference.export import DECODE_MODES, DEFAULT_OPSET, EXPORTERS

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
        "--chunk", type=positive_int("--chunk"), help="samples per pass (default: fit ~256 images)"
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
    p.add_argument("--out", required=True, help="ONNX file to write")
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
