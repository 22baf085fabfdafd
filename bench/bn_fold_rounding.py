"""How far eval-mode BN folding moves a trained model's per-image ELBO, against float32's own error.

Trains a small network (the fmnist-cpu preset at 8 channels, two scales of two groups, one flow pair) for
--steps steps on the first 256 Fashion-MNIST training images, then computes the per-image ELBO of 256 test
images with one fixed noise draw three ways: plain chain and folded chain in float32, and the plain chain in
float64. Prints the relative differences (largest and median).

    python bench/bn_fold_rounding.py --steps 100
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    a = p.parse_args(argv)

    import torch

    from data.loaders import make_loader
    from data.prepare import prepare
    from model.config import apply_overrides, get_preset
    from model.layers import bn_folding
    from model.network import NVAE
    from training.train import Objective, learning_rate, make_optimizer, training_step

    small = {"channels": 8, "z_channels": 4, "groups": 2, "num_scales": 2, "cells_enc": 1, "cells_dec": 1,
             "pre_blocks": 1, "pre_cells": 1, "post_blocks": 1, "post_cells": 1, "num_nf": 1}  # fmt: skip
    cfg = apply_overrides(get_preset("fmnist-cpu"), small)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare("fashion-mnist", FASHION_MNIST, data, limit=256)
        torch.manual_seed(0)
        net = NVAE(cfg)
        objective, opt = Objective(net), make_optimizer(cfg, net)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loaders = (make_loader(data, "train", 32, train=True, binarize=True, epoch=e) for e in range(10**6))
        batches = (x for loader in loaders for x in loader)
        for step in range(a.steps):
            training_step(
                objective, opt, scaler, batches, step, a.steps, learning_rate(cfg, step, a.steps, 8)
            )
        (x,) = list(make_loader(data, "test", 256, train=False, binarize=True))
    net.eval()
    g = torch.Generator().manual_seed(5)
    eps = [torch.randn((x.size(0), *s), generator=g) for s in net.latent_shapes()]

    def elbo(model, inputs, noise):
        with torch.no_grad():
            out = model(inputs, eps=noise)
            return (-model.reconstruction_nll(out.logits, inputs) + out.log_p - out.log_q).double()

    got = {}
    for fold in (False, True):
        with bn_folding(fold):
            got[fold] = elbo(net, x, eps)
    with bn_folding(False):
        exact = elbo(net.double(), x.double(), [e.double() for e in eps])

    def rel(u, v):
        r = (u - v).abs() / v.abs()
        return f"largest {float(r.max()):.2e}, median {float(r.median()):.2e}"

    print(f"{a.steps} steps; mean ELBO {float(got[False].mean()):.2f} nats over {x.size(0)} test images")
    print(f"  folded vs plain (float32): {rel(got[True], got[False])}")
    print(f"  plain float32 vs float64:  {rel(got[False], exact)}")
    print(f"  folded float32 vs float64: {rel(got[True], exact)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
