"""Eval-mode BN folded into the neighbouring convolutions (`model.layers.FusedSequential`) against the plain
chain, in one process, alternating: evaluation passes (`inference.evaluate.iw_batch`, one importance sample: the
work per test batch, without `evaluate`'s once-per-call memory probe) and prior sampling, on the recipe's
network at its CPU defaults (channels-last, `configure_cpu`), fp32.

    python bench/bn_fold_speed.py --preset mnist --batch 32 --repeats 5
    python bench/bn_fold_speed.py --preset mnist --batch 32 --profile    # ops' self time of 3 folded passes

Prints ms per image of each path and their ratio, and the largest relative difference of the per-image
ELBO (the same noise) and of the samples."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="mnist")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sample-batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="profile 3 evaluation passes (folded) and stop")
    a = p.parse_args(argv)

    import torch

    from inference.evaluate import iw_batch
    from model.config import get_preset
    from model.layers import bn_folding
    from model.network import NVAE
    from model.precision import configure_cpu
    from model.prior_sampling import sample_images

    configure_cpu()
    torch.manual_seed(0)
    cfg = get_preset(a.preset)
    net = NVAE(cfg).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(1)
    for m in net.modules():  # BN statistics of a trained model's size, not the identity of a fresh one
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    net.eval()
    side, c = cfg.data_size, cfg.in_channels
    x = (torch.rand(a.batch, c, side, side, generator=g) < 0.5).float()
    if cfg.likelihood != "bernoulli":
        x = torch.randint(0, 256, (a.batch, c, side, side), generator=g).float() / 255
    x = x.contiguous(memory_format=torch.channels_last)
    eps = [torch.randn((a.batch, *s), generator=g) for s in net.latent_shapes()]

    def elbo():
        with torch.no_grad():
            out = net(x, eps=eps)
            return -net.reconstruction_nll(out.logits, x) + out.log_p - out.log_q

    if a.profile:
        return _profile(lambda: iw_batch(net, x, 1, 1, torch.Generator().manual_seed(0)), 3)
    kinds = {
        "eval": (lambda: iw_batch(net, x, 1, 1, torch.Generator().manual_seed(0)), a.batch),
        "sample": (lambda: sample_images(net, a.sample_batch, 1.0, 0, "mean", batch_size=a.sample_batch),
                   a.sample_batch),
    }  # fmt: skip
    times: dict = {(k, f): [] for k in kinds for f in (False, True)}
    for fold in (False, True):  # warm-up
        with bn_folding(fold):
            for fn, _ in kinds.values():
                fn()
    for _ in range(a.repeats):
        for fold in (False, True):
            with bn_folding(fold):
                for kind, (fn, n) in kinds.items():
                    t = time.perf_counter()
                    fn()
                    times[kind, fold].append(1000 * (time.perf_counter() - t) / n)
    print(f"{a.preset}, batch {a.batch} (sampling {a.sample_batch}), {torch.get_num_threads()} threads, "
          f"median of {a.repeats}")  # fmt: skip
    for kind in kinds:
        plain, folded = (statistics.median(times[kind, f]) for f in (False, True))
        print(
            f"  {kind}: plain {plain:.2f} ms/image, folded {folded:.2f} ms/image, ratio {folded / plain:.3f}"
        )
    with bn_folding(False):
        e0 = elbo()
        s0 = sample_images(net, 8, 1.0, 3, "mean", batch_size=8)
    with bn_folding(True):
        e1 = elbo()
        s1 = sample_images(net, 8, 1.0, 3, "mean", batch_size=8)
    rel = float(((e1 - e0).abs() / e0.abs()).max())
    diff = float((torch.as_tensor(s1) - torch.as_tensor(s0)).abs().max())
    print(f"  per-image ELBO: largest relative difference {rel:.1e}; samples: largest difference {diff:.1e}")
    return 0


def _profile(fn, passes: int) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(passes):
            fn()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops) / passes / 1000
    print(f"ops' self time per pass: {total:.1f} ms")
    for e in ops[:15]:
        ms = e.self_cpu_time_total / passes / 1000
        print(f"  {e.key[:40]:40s} {ms:8.1f} ms ({100 * ms / total:4.1f} %), {e.count // passes} calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
