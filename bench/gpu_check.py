"""Exercise every CUDA path of the project on a lent GPU and write the figures to OUT/gpu_check.json.

Sections (each independent; a failure is recorded, not fatal): training steps in fp32/bf16/fp16 (GradScaler),
each with the authors' published img/s per V100 (paper Table 6) beside it; the `gpu`-marked tests; DALI GPU
preparation vs CPU; onnxruntime-gpu parity and ms/image; the FID Inception network on CUDA (parity with CPU,
images/s; needs pytorch-fid, from .whl/ where the machine lacks it).

    python bench/gpu_check.py --out OUTDIR [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

# The authors' training throughput per GPU, from the paper's Table 6 (epochs x training images / total train
# time / GPUs, all 16- or 32-GB V100s; their per-GPU batch). It includes their evaluation and data loading and
# ran on another GPU, so a ratio against it is context only.
AUTHORS_TABLE6 = {
    # preset: (epochs, training images, hours, GPUs, batch per GPU)
    "mnist": (400, 60_000, 21, 2, 200),
    "cifar10": (400, 50_000, 55, 8, 32),
}


def authors_img_per_s_per_gpu(preset: str) -> float | None:
    """Images per second per V100 of the authors' published training run of `preset`, or None."""
    if preset not in AUTHORS_TABLE6:
        return None
    epochs, images, hours, gpus, _ = AUTHORS_TABLE6[preset]
    return epochs * images / (hours * 3600) / gpus


def with_authors_reference(preset: str, figures: dict) -> dict:
    """`figures` (a train_steps result) with the authors' published img/s per GPU and our ratio to it."""
    ref = authors_img_per_s_per_gpu(preset)
    if ref is None:
        return figures
    epochs, images, hours, gpus, batch = AUTHORS_TABLE6[preset]
    return {
        **figures,
        "authors_published_img_per_s_per_v100": round(ref, 1),
        "authors_published_from": f"{epochs} epochs x {images} images / {hours} h / {gpus} V100s, batch {batch}/GPU",
        "ratio_vs_authors_published": round(figures["img_per_s"] / ref, 2),
    }


def section(results: dict, name: str):
    def wrap(fn):
        start = time.perf_counter()
        try:
            results[name] = {"ok": True, **fn()}
        except Exception as exc:  # record and go on: one broken path must not hide the others
            results[name] = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "trace": traceback.format_exc(),
            }
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"[{name}] {json.dumps({k: v for k, v in results[name].items() if k != 'trace'})}", flush=True)
        return fn

    return wrap


def train_steps(preset: str, batch: int, precision: str, steps: int, channels_last: bool = False) -> dict:
    import torch

    from model.config import get_preset
    from model.network import NVAE
    from model.objective import kl_balance_alphas, nvae_loss
    from model.precision import autocast
    from training.train import make_optimizer

    torch.manual_seed(0)
    cfg = get_preset(preset)
    model = NVAE(cfg).cuda()
    if channels_last:  # NHWC: the CPU default; whether it should be CUDA's too is what this measures
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0, enabled=precision == "fp16")
    alphas = kl_balance_alphas(cfg.groups_per_scale).cuda()
    x = torch.rand(batch, cfg.in_channels, cfg.data_size, cfg.data_size, device="cuda")
    if cfg.binarize:
        x = (x > 0.5).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(steps + 2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast("cuda", precision):
            terms = nvae_loss(model, x, i, 10_000, alphas)
        scaler.scale(terms.loss).backward()
        scaler.step(opt)
        scaler.update()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
        losses.append(float(terms.loss.detach()))
    times.sort()
    med = times[len(times) // 2]
    return {
        "img_per_s": round(batch / med, 1),
        "step_ms": round(1000 * med, 1),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 1024**3, 2),
        "losses_finite": all(l == l and abs(l) < float("inf") for l in losses),
        "last_loss": losses[-1],
    }


def onnx_gpu_check(
    outdir: str | Path,
    preset: str = "mnist",
    batches: tuple[int, ...] = (1, 16, 64, 256),
    exporter: str = "dynamo",
) -> dict:
    """On a CUDA machine with onnxruntime-gpu: export fp32 and fp16 graphs of a random-init `preset` (BN
    statistics randomised), check parity against PyTorch (CPU fp32 reference, batch 64, t=0.8) and time
    PyTorch CUDA eager vs onnxruntime (ms/image). Writes `outdir/onnx/onnx_gpu_check.json`, returns the dict.
    Budget: two mnist exports take about a minute each with the dynamo exporter (seconds with torchscript)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from inference.export import GenerativePath, _export_copy, export_model, randomize_bn
    from model.config import get_preset
    from model.network import NVAE
    from serving.onnx_sampler import OnnxSampler

    outdir = Path(outdir) / "onnx"
    outdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = NVAE(get_preset(preset))
    randomize_bn(model)
    report: dict[str, Any] = {"preset": preset, "ort_version": ort.__version__, "torch": torch.__version__}
    report["exporter"] = exporter
    report["available_providers"] = ort.get_available_providers()
    g = torch.Generator().manual_seed(1)
    eps = [torch.randn((64, *s), generator=g) for s in model.latent_shapes()]
    ref = GenerativePath(_export_copy(model, False))(torch.tensor([0.8]), *eps)[1].numpy()
    for precision in ("fp32", "fp16"):
        path = outdir / f"{preset}-{precision}.onnx"
        export_model(model, path, fp16=precision == "fp16", verify=False, exporter=exporter)
        sampler = OnnxSampler(path, providers="auto")
        entry: dict[str, Any] = {"providers": sampler.providers}
        feeds = {"temperature": np.array([0.8], np.float32)}
        feeds.update({f"eps_{j}": e.numpy() for j, e in enumerate(eps)})
        got = sampler.session.run(["images_continuous"], feeds)[0]
        entry["max_abs_diff_vs_torch_cpu_fp32"] = float(np.abs(got - ref).max())
        entry["mean_abs_diff_vs_torch_cpu_fp32"] = float(np.abs(got - ref).mean())
        entry["ms_per_image"] = {}
        for b in batches:
            sampler.sample(b, 0.8, seed=0, batch_size=b)  # warm-up (cuDNN algorithm search per shape)
            t = time.perf_counter()
            sampler.sample(b, 0.8, seed=0, batch_size=b)
            entry["ms_per_image"][b] = 1000 * (time.perf_counter() - t) / b
        # IO binding (the sampler's default on CUDA) against a plain session.run: same images, ms/image.
        plain = OnnxSampler(path, providers="auto", io_binding=False)
        entry["io_binding"] = sampler.io_binding
        entry["io_binding_max_abs_diff_vs_run"] = float(
            np.abs(sampler.sample(64, 0.8, seed=3) - plain.sample(64, 0.8, seed=3)).max()
        )
        entry["plain_run_ms_per_image"] = {}
        for b in batches:
            plain.sample(b, 0.8, seed=0, batch_size=b)
            t = time.perf_counter()
            plain.sample(b, 0.8, seed=0, batch_size=b)
            entry["plain_run_ms_per_image"][b] = 1000 * (time.perf_counter() - t) / b
        # The optimised-graph cache: a session's start optimising vs from the cache.
        cache = outdir / f"ort-cache-{precision}"
        for key in ("start_optimising_s", "start_from_cache_s"):
            t = time.perf_counter()
            OnnxSampler(path, providers="auto", cache_dir=cache)
            entry[key] = time.perf_counter() - t
        report[precision] = entry
    if torch.cuda.is_available():
        from model.prior_sampling import sample_images

        cuda_model = _export_copy(model, False).cuda()
        report["torch_cuda_eager_ms_per_image"] = {}
        for b in batches:
            sample_images(cuda_model, b, 0.8, 0, batch_size=b)
            torch.cuda.synchronize()
            t = time.perf_counter()
            sample_images(cuda_model, b, 0.8, 0, batch_size=b)
            torch.cuda.synchronize()
            report["torch_cuda_eager_ms_per_image"][b] = 1000 * (time.perf_counter() - t) / b
    (outdir / "onnx_gpu_check.json").write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="fewer steps")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    steps = 3 if args.quick else 10

    @section(results, "env")
    def _env():
        import torch

        return {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0),
        }

    for preset, batch in (("mnist", 32), ("cifar10", 32)):
        for precision in ("fp32", "bf16", "fp16"):
            section(results, f"train_{preset}_b{batch}_{precision}")(
                lambda p=preset, b=batch, q=precision: with_authors_reference(p, train_steps(p, b, q, steps))
            )
        section(results, f"train_{preset}_b{batch}_fp16_channels_last")(
            lambda p=preset, b=batch: with_authors_reference(
                p, train_steps(p, b, "fp16", steps, channels_last=True)
            )
        )

    @section(results, "pytest_gpu")
    def _pytest():
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
            capture_output=True,
            text=True,
            timeout=240,
        )
        (out / "pytest_gpu.log").write_text(proc.stdout + proc.stderr)
        return {"returncode": proc.returncode, "summary": (proc.stdout.strip().splitlines() or [""])[-1]}

    @section(results, "dali_gpu_prepare")
    def _dali():
        import numpy as np
        from PIL import Image

        from data.prepare import prepare

        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "imgs"
            src.mkdir()
            rng = np.random.default_rng(0)
            for i in range(256):
                Image.fromarray(rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)).save(src / f"{i:04d}.png")
            timings = {}
            for dev in ("cpu", "gpu"):
                t = time.perf_counter()
                prepare("image-folder", src, Path(tmp) / dev, size=64, device=dev)
                timings[dev] = time.perf_counter() - t
            a = np.load(Path(tmp) / "cpu" / "train.npy")
            b = np.load(Path(tmp) / "gpu" / "train.npy")
            diff = int(np.abs(a.astype(int) - b.astype(int)).max())
            return {
                "images": 256,
                "cpu_s": round(timings["cpu"], 2),
                "gpu_s": round(timings["gpu"], 2),
                "max_abs_diff_gpu_vs_cpu": diff,
            }

    @section(results, "onnx_gpu")
    def _onnx():
        return onnx_gpu_check(out)

    @section(results, "fid_gpu")
    def _fid():
        """The FID Inception network (pytorch-fid's, random weights: the same cost) on CUDA against CPU, and its
        images/s on CUDA (the part of `nvae fid` that dominates on CPU)."""
        import torch

        from inference import fid

        with tempfile.TemporaryDirectory() as tmp:
            weights = Path(tmp) / "inception.pth"
            sha = fid.write_random_weights(weights)
            cpu, gpu = fid.load_inception(weights, sha, "cpu"), fid.load_inception(weights, sha, "cuda")
        x = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        ref = fid.features(cpu, x)
        diff = float(abs(fid.features(gpu, x) - ref).max() / max(abs(ref).max(), 1e-12))
        batch = torch.rand(100, 3, 64, 64)
        fid.features(gpu, batch)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            fid.features(gpu, batch)
        torch.cuda.synchronize()
        return {"max_rel_diff_gpu_vs_cpu": diff, "s_per_1000_images": round((time.perf_counter() - t) * 2, 2)}

    (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out / 'gpu_check.json'}")


if __name__ == "__main__":
    main()
