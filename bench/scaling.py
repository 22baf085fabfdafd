"""How the cost of training and evaluation grows, each figure in a fresh process on this CPU, fp32,
channels-last, `configure_cpu` (as `nvae train` runs):

- training img/s and peak RSS against the batch size (the `mnist` recipe's network);
- training cost per image against the model (fmnist-cpu, mnist, cifar10, celeba64 at batch 4);
- evaluation time per image against the importance samples K (`iw_batch`, the `mnist` network, batch 8).

    python bench/scaling.py --batches 8 16 32 64 128 --steps 3

Random-init weights and inputs; the median step after one warm-up step. Prints markdown tables."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(spec: dict) -> dict:
    import torch

    from bench.vs_official import peak_rss_gib
    from model.config import apply_overrides, get_preset
    from model.network import NVAE
    from model.precision import configure_cpu

    configure_cpu()
    torch.manual_seed(0)
    cfg = apply_overrides(get_preset(spec["preset"]), {"batch_size": spec["batch"]})
    net = NVAE(cfg).to(memory_format=torch.channels_last)
    side, c = cfg.data_size, cfg.in_channels
    x = torch.rand(spec["batch"], c, side, side)
    x = ((x < 0.5).float() if cfg.likelihood == "bernoulli" else (x * 255).round() / 255).contiguous(
        memory_format=torch.channels_last
    )
    out = {"params": sum(p.numel() for p in net.parameters())}
    if spec["kind"] == "train":
        from training.train import Objective, make_optimizer, training_step

        objective, opt = Objective(net), make_optimizer(cfg, net)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        times = []
        for step in range(1 + spec["steps"]):
            t = time.perf_counter()
            training_step(objective, opt, scaler, iter([x]), step, 10_000, 1e-3, channels_last=True)
            times.append(time.perf_counter() - t)
        out["step_s"] = statistics.median(times[1:])
        out["img_per_s"] = spec["batch"] / out["step_s"]
    else:
        from inference.evaluate import iw_batch

        net.eval()
        times = []
        for _ in range(1 + spec["steps"]):
            t = time.perf_counter()
            iw_batch(net, x, spec["k"], spec["k"] if spec["k"] * spec["batch"] <= 64 else max(1, 64 // spec["batch"]),
                     torch.Generator().manual_seed(0))  # fmt: skip
            times.append(time.perf_counter() - t)
        out["ms_per_image"] = 1000 * statistics.median(times[1:]) / spec["batch"]
    out["peak_rss_gib"] = peak_rss_gib()
    return out


def run(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    p.add_argument("--presets", nargs="+", default=["fmnist-cpu", "mnist", "cifar10", "celeba64"])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    print("| batch | img/s | step, s | peak RSS, GiB |\n|---:|---:|---:|---:|")
    for b in a.batches:
        r = run({"kind": "train", "preset": "mnist", "batch": b, "steps": a.steps})
        print(f"| {b} | {r['img_per_s']:.1f} | {r['step_s']:.2f} | {r['peak_rss_gib']:.2f} |", flush=True)
    print("\n| preset (batch 4) | parameters | ms/image | peak RSS, GiB |\n|---|---:|---:|---:|")
    for preset in a.presets:
        r = run({"kind": "train", "preset": preset, "batch": 4, "steps": a.steps})
        print(
            f"| {preset} | {r['params']:,} | {1000 / r['img_per_s']:.0f} | {r['peak_rss_gib']:.2f} |",
            flush=True,
        )
    print("\n| K (batch 8) | ms/image | ms per image-sample |\n|---:|---:|---:|")
    for k in a.ks:
        r = run({"kind": "eval", "preset": "mnist", "batch": 8, "k": k, "steps": a.steps})
        print(f"| {k} | {r['ms_per_image']:.1f} | {r['ms_per_image'] / k:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
