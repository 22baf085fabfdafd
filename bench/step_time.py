"""Time one training step (forward + backward + AdaMax) of a preset on this CPU, in several variants.

Each variant runs in its own process so its peak RSS is its own. Prints a table and ratios against the first
variant, measured side by side in this one run.

    python bench/step_time.py --preset mnist --batch 32 --steps 6 --warmup 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "fp32": {"precision": "fp32", "fused": True},
    "fp32-unfused-bn-swish": {"precision": "fp32", "fused": False},
    "bf16": {"precision": "bf16", "fused": True},
}


def run_variant(preset: str, batch: int, steps: int, warmup: int, precision: str, fused: bool) -> dict:
    import torch

    from model.config import apply_overrides, get_preset
    from model.network import NVAE
    from model.objective import kl_balance_alphas, nvae_loss
    from model.runtime import autocast, configure_cpu
    from model.train import make_optimizer

    configure_cpu()
    torch.manual_seed(0)
    cfg = apply_overrides(get_preset(preset), {"fused_bn_swish": fused})
    model = NVAE(cfg)
    opt = make_optimizer(cfg, model)
    alphas = kl_balance_alphas(cfg.groups_per_scale)
    x = torch.rand(batch, cfg.in_channels, cfg.data_size, cfg.data_size)
    if cfg.binarize:
        x = (x > 0.5).float()
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast("cpu", precision):
            terms = nvae_loss(model, x, i, 10_000, alphas)
        terms.loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {
        "step_s": med,
        "img_per_s": batch / med,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "loss": float(terms.loss.detach()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mnist")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        v = VARIANTS[args._child]
        print(
            json.dumps(
                run_variant(args.preset, args.batch, args.steps, args.warmup, v["precision"], v["fused"])
            )
        )
        return
    import torch

    print(
        f"preset={args.preset} batch={args.batch} steps={args.steps} (median after {args.warmup} warm-up) "
        f"torch={torch.__version__} threads={torch.get_num_threads()}"
    )
    results = {}
    for name in args.variants:
        cmd = [
            sys.executable,
            __file__,
            "--preset",
            args.preset,
            "--batch",
            str(args.batch),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--_child",
            name,
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    base = results[args.variants[0]]
    print(f"{'variant':24s} {'s/step':>8s} {'img/s':>8s} {'peak RSS GB':>12s} {'speed x':>8s} {'RSS x':>7s}")
    for name, r in results.items():
        print(
            f"{name:24s} {r['step_s']:8.3f} {r['img_per_s']:8.2f} {r['peak_rss_gb']:12.2f} "
            f"{base['step_s'] / r['step_s']:8.2f} {r['peak_rss_gb'] / base['peak_rss_gb']:7.2f}"
        )


if __name__ == "__main__":
    main()
