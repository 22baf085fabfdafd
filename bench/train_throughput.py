"""Training throughput (img/s) and peak RSS of one preset and batch size, in several variants of the real step.

The step is the training loop's: `Objective` (forward, reconstruction, balanced KL, spectral and BN terms)
under autocast, backward through GradScaler, grad norm, AdaMax. Each variant runs in its own process, so its
peak RSS is its own; img/s is the batch over the median step time after warm-up. Ratios are against the first
variant, measured side by side in this one run. With `--rounds N` every variant runs N times, alternating, and
the round with the median step time is reported (this VM's speed drifts by up to 30 % within minutes).

    python bench/train_throughput.py --preset mnist --batch 32 --steps 3 --warmup 1 \
        --variants fp32 fp32-cl
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "fp32": {"precision": "fp32", "channels_last": False, "compile": False},
    "fp32-cl": {"precision": "fp32", "channels_last": True, "compile": False},
    "bf16": {"precision": "bf16", "channels_last": False, "compile": False},
    "bf16-cl": {"precision": "bf16", "channels_last": True, "compile": False},
    "fp32-compile": {"precision": "fp32", "channels_last": False, "compile": True},
    "fp32-cl-compile": {"precision": "fp32", "channels_last": True, "compile": True},
    # BN+Swish without the fused, recomputing op (two saved activations instead of one)
    "fp32-unfused": {"precision": "fp32", "channels_last": False, "compile": False, "fused": False},
    "fp32-cl-unfused": {"precision": "fp32", "channels_last": True, "compile": False, "fused": False},
    # glibc's default malloc (large blocks mmap'd and unmapped on free) instead of `keep_malloc_arena`
    "fp32-cl-glibc-default": {
        "precision": "fp32",
        "channels_last": True,
        "compile": False,
        "keep_arena": False,
    },
}


def run_variant(
    preset: str,
    batch: int,
    steps: int,
    warmup: int,
    precision: str,
    channels_last: bool,
    compile: bool,
    fused: bool = True,
    keep_arena: bool = True,
    profile: bool = False,
):
    import torch

    from model.config import apply_overrides, get_preset
    from model.network import NVAE
    from model.precision import autocast, configure_cpu
    from training.train import Objective, make_optimizer

    configure_cpu(keep_freed_memory=keep_arena)
    torch.manual_seed(0)
    cfg = apply_overrides(get_preset(preset), {"batch_size": batch, "fused_bn_swish": fused})
    model = NVAE(cfg)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    objective = Objective(model)
    if compile:
        model.compile()
    opt = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.rand(batch, cfg.in_channels, cfg.data_size, cfg.data_size)
    if cfg.binarize:
        x = (x > 0.5).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step(i: int):
        opt.zero_grad(set_to_none=True)
        with autocast("cpu", precision):
            terms = objective(x, i, 10_000)
        scaler.scale(terms.loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        scaler.step(opt)
        scaler.update()
        return terms

    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        terms = step(i)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    peak_rss_gb = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    )  # before a profiled step's records
    split = None
    if profile:  # one more step under torch.profiler, by op group (bench/vs_official.py's groups)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from vs_official import profile_split

        split = profile_split(lambda: step(warmup + steps))
    return {
        "profile": split,
        "step_s": med,
        "img_per_s": batch / med,
        "peak_rss_gb": peak_rss_gb,
        "loss": float(terms.loss.detach()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mnist")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--variants", nargs="*", default=["fp32", "fp32-cl", "bf16"], choices=list(VARIANTS))
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every variant this many times, alternating, and report the median round (shared machines)",
    )
    ap.add_argument(
        "--reference-img-s",
        type=float,
        help="the authors' img/s measured on this machine (bench/vs_official.py) for a 'vs ref' column; "
        "a figure from another machine is context, never the reference",
    )
    ap.add_argument("--reference-rss-gb", type=float, help="the authors' peak RSS, likewise")
    ap.add_argument(
        "--profile", action="store_true", help="profile one more step per variant: seconds by op group"
    )
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        v = VARIANTS[args._child]
        result = run_variant(args.preset, args.batch, args.steps, args.warmup, **v, profile=args.profile)
        print(json.dumps(result))
        return
    import torch

    print(
        f"preset={args.preset} batch={args.batch} steps={args.steps} (median after {args.warmup} warm-up) "
        f"torch={torch.__version__} threads={torch.get_num_threads()} cpu={torch.backends.cpu.get_cpu_capability()}"
    )
    runs: dict[str, list[dict]] = {name: [] for name in args.variants}
    for _ in range(args.rounds):
        for name in args.variants:
            cmd = [sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch)]
            cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--_child", name]
            cmd += ["--profile"] if args.profile else []
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                print(f"{name}: failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results = {}
    for name, rs in runs.items():
        if rs:
            step_times = [r["step_s"] for r in rs]
            results[name] = dict(sorted(rs, key=lambda r: r["step_s"])[len(rs) // 2])
            if len(rs) > 1:
                print(f"{name}: s/step per round " + " ".join(f"{t:.3f}" for t in step_times))
    if not results:
        return
    base = next(iter(results.values()))
    header = (
        f"{'variant':16s} {'s/step':>8s} {'img/s':>8s} {'peak RSS GB':>12s} {'speed x':>8s} {'RSS x':>7s}"
    )
    ref = args.reference_img_s is not None and args.reference_rss_gb is not None
    header += (f" {'vs ref img/s':>13s} {'vs ref RSS':>11s}" if ref else "") + f" {'loss':>10s}"
    print(header)
    for name, r in results.items():
        line = (
            f"{name:16s} {r['step_s']:8.3f} {r['img_per_s']:8.2f} {r['peak_rss_gb']:12.2f} "
            f"{base['step_s'] / r['step_s']:8.2f} {r['peak_rss_gb'] / base['peak_rss_gb']:7.2f}"
        )
        if ref:
            line += f" {r['img_per_s'] / args.reference_img_s:13.2f} {r['peak_rss_gb'] / args.reference_rss_gb:11.2f}"
        print(line + f" {r['loss']:10.1f}")
    for name, r in results.items():
        if r.get("profile"):
            split = ", ".join(f"{k} {v:.3f}" for k, v in r["profile"].items())
            print(f"{name}: one profiled step, s: {split}")


if __name__ == "__main__":
    main()
