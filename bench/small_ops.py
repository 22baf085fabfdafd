"""The per-parameter work of a training step, per layer as the step runs it and horizontally batched.

A training step runs three kinds of work once per parameter tensor, whatever the batch: the weight norm of
every convolution (forward and backward), the spectral regularizer's power iterations and its bilinear form,
and the AdaMax update. This script times each, in one process, on the network of one recipe:

- as `nvae train` runs it: one small op chain per layer or parameter (the weight norm of each `WNConv2d`,
  `SpectralRegularizer`, `torch.optim.Adamax`);
- horizontally batched: the layers of one weight shape stacked as one (L, ...) tensor (the layout a grouped
  parameter storage would give, each layer's weight a view of it), one op chain per shape; AdaMax with
  `foreach=True`, on one flat tensor holding every parameter, and that flat update compiled into one loop
  (inductor, where a C++ compiler is present);
- and one region compiled whole: a decoder group (two cells) under torch.compile against eager, in training and
  in evaluation (the "per layer" column is then eager, the "batched" one compiled; minimum of two medians each).

Stacking happens before the clock starts: the figures are what batching would buy once the parameters live
in such a layout, an upper bound on the gain of that change. Values are checked against the per-layer form.

    python bench/small_ops.py --preset mnist --repeats 7
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.sampling_speed import _time  # noqa: E402  (after the repository root joins sys.path)


def _median_ms(fn, repeats: int) -> float:
    """ms: one warm-up call of fn, then the median of `repeats` calls (bench/sampling_speed.py's timer)."""
    return 1e3 * _time(fn, repeats)


def _groups(convs):
    by_shape: dict[tuple, list] = {}
    for conv in convs:
        by_shape.setdefault((tuple(conv.weight.shape), conv.mask is not None), []).append(conv)
    return list(by_shape.values())


def weight_norm_rows(convs, repeats: int) -> tuple[float, float, float]:
    """Forward and backward of every conv's weight norm, per layer and per stacked shape group."""
    grads = [torch.randn_like(c.weight) for c in convs]
    leaves = [p for c in convs for p in (c.weight, c.log_g)]

    def per_layer():
        ws = [c._normalised_weight() for c in convs]
        torch.autograd.backward(ws, grads)

    groups = _groups(convs)
    stacked = []
    for group in groups:
        v = torch.stack([c.weight.detach() for c in group]).requires_grad_()
        g = torch.stack([c.log_g.detach() for c in group]).requires_grad_()
        mask = torch.stack([c.mask for c in group]) if group[0].mask is not None else None
        up = torch.stack([grads[convs.index(c)] for c in group])
        stacked.append((v, g, mask, up))

    def batched():
        outs, ups = [], []
        for v, g, mask, up in stacked:
            w = v if mask is None else v * mask
            norm = torch.linalg.vector_norm(w, dim=(2, 3, 4), keepdim=True)
            outs.append(w * (g.exp() / (norm + 1e-5)))
            ups.append(up)
        torch.autograd.backward(outs, ups)

    for p in leaves:
        p.grad = None
    per_layer()
    ref = [c.weight.grad.clone() for c in convs]
    for _, (v, *_rest) in zip(groups, stacked, strict=True):
        v.grad = None
    batched()
    err = max(
        float((v.grad[i] - ref[convs.index(c)]).abs().max())
        for group, (v, *_r) in zip(groups, stacked, strict=True)
        for i, c in enumerate(group)
    )
    return _median_ms(per_layer, repeats), _median_ms(batched, repeats), err


def power_iteration_rows(model, repeats: int) -> tuple[float, float]:
    """The spectral term (4 power iterations per layer and u^T W v, forward and backward): per layer as the
    step runs it, and per stacked shape group as batched matrix products."""
    from model.layers import WNConv2d
    from model.regularizers import SpectralRegularizer

    sr = SpectralRegularizer(model)
    modules = dict(model.named_modules())
    for m in modules.values():  # normalised weights as leaves: the weight norm is timed above, not here
        if isinstance(m, WNConv2d):
            m._weight_cache = [m.effective_weight().detach().requires_grad_()]
    sr(model)  # the first call's long iteration

    def per_layer():
        sr(model).backward()

    stacked = []
    for k, names in enumerate(sr.group_names):
        w = torch.stack(
            [modules[n].effective_weight().detach().reshape(len(modules[n].weight), -1) for n in names]
        )
        stacked.append((w.requires_grad_(), getattr(sr, f"u_{k}").clone(), getattr(sr, f"v_{k}").clone()))

    def batched():
        total = 0
        for w, u, v in stacked:
            with torch.no_grad():
                wd = w.detach()
                for _ in range(sr.iters):
                    v = F.normalize(torch.bmm(u.unsqueeze(1), wd).squeeze(1), dim=1, eps=1e-3)
                    u = F.normalize(torch.bmm(wd, v.unsqueeze(2)).squeeze(2), dim=1, eps=1e-3)
            total = total + (u.unsqueeze(1) @ (w @ v.unsqueeze(2))).sum()
        total.backward()

    times = _median_ms(per_layer, repeats), _median_ms(batched, repeats)
    for m in modules.values():
        if isinstance(m, WNConv2d):
            m._weight_cache = None
    return times


def adamax_rows(model, repeats: int, compile_flat: bool) -> dict[str, float]:
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-3, weight_decay=3e-4)
    out = {}
    for name, foreach in (("per parameter (nvae train)", False), ("foreach=True", True)):
        opt = torch.optim.Adamax(params, foreach=foreach, **kw)
        out[name] = _median_ms(opt.step, repeats)
    n = sum(p.numel() for p in params)
    flat = torch.zeros(n, requires_grad=True)
    flat.grad = torch.randn(n)
    p_grad = torch.randn(n)
    opt = torch.optim.Adamax([flat], **kw)
    out["one flat tensor"] = _median_ms(opt.step, repeats)
    zero_and_add = _median_ms(lambda: (flat.grad.zero_(), flat.grad.add_(p_grad)), repeats)
    out["flat gradient: zero + accumulate (extra)"] = zero_and_add
    if compile_flat:
        m, u = torch.zeros(n), torch.zeros(n)
        p, g = flat.detach().clone(), flat.grad.clone()

        def update(p, g, m, u, lr: float, bc: float):
            g = g + 3e-4 * p
            m.lerp_(g, 0.1)
            u.copy_(torch.maximum(u * 0.999, g.abs() + 1e-3))
            p.sub_(lr / bc * m / u)

        fused = torch.compile(update, dynamic=False)
        try:
            out["one flat tensor, one compiled loop"] = _median_ms(
                lambda: fused(p, g, m, u, 1e-3, 0.5), repeats
            )
        except Exception as exc:  # no compiler: say so and go on
            print(f"compiled AdaMax skipped: {type(exc).__name__}: {exc}".splitlines()[0])
    return out


def cell_rows(model, repeats: int) -> list[tuple[str, float, float]]:
    """A region compiled whole: one decoder group (two cells at 8x8, 128 channels, batch 32) under
    torch.compile (inductor, static shapes) against eager, in a training step (forward and backward, train-mode
    BN) and in an evaluation pass (no gradients, eval-mode BN). Alternating, twice each."""
    bn = nn.modules.batchnorm._BatchNorm
    group = next(
        g
        for g in model.dec_groups
        if len(g) and next(m for m in g.modules() if isinstance(m, bn)).num_features == 128
    )
    x = torch.randn(32, 128, 8, 8).contiguous(memory_format=torch.channels_last)

    def train_pass(f):
        f(x).square().mean().backward()

    rows = []
    model.train()
    compiled = torch.compile(group, dynamic=False)
    t = time.perf_counter()
    train_pass(compiled)
    print(f"(compiling the training region: {time.perf_counter() - t:.1f} s)")
    eager_ms = [_median_ms(lambda: train_pass(group), repeats) for _ in range(2)]
    comp_ms = [_median_ms(lambda: train_pass(compiled), repeats) for _ in range(2)]
    rows.append(("decoder group, training, torch.compile", min(eager_ms), min(comp_ms)))
    model.eval()
    with torch.no_grad():
        compiled = torch.compile(group, dynamic=False)
        compiled(x)
        eager_ms = [_median_ms(lambda: group(x), repeats) for _ in range(2)]
        comp_ms = [_median_ms(lambda: compiled(x), repeats) for _ in range(2)]
    rows.append(("decoder group, evaluation, torch.compile", min(eager_ms), min(comp_ms)))
    model.train()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mnist")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument(
        "--no-compile", action="store_true", help="skip the compiled rows (AdaMax, a decoder group)"
    )
    args = ap.parse_args()

    from model.config import get_preset
    from model.layers import WNConv2d
    from model.network import NVAE
    from model.precision import configure_cpu

    configure_cpu()
    torch.manual_seed(0)
    model = NVAE(get_preset(args.preset)).to(memory_format=torch.channels_last)
    convs = [m for m in model.modules() if isinstance(m, WNConv2d) and m.log_g is not None]
    shapes = len(_groups(convs))
    print(
        f"{args.preset}: {len(convs)} weight-normalised convs in {shapes} shapes, "
        f"{sum(1 for _ in model.parameters())} parameter tensors, threads {torch.get_num_threads()}"
    )
    print(f"{'work':<44} {'per layer, ms':>14} {'batched, ms':>12} {'ratio':>7}")
    a, b, err = weight_norm_rows(convs, args.repeats)
    print(
        f"{'weight norm, forward + backward':<44} {a:>14.1f} {b:>12.1f} {b / a:>7.2f}   (grad max diff {err:.1e})"
    )
    a, b = power_iteration_rows(model, args.repeats)
    print(f"{'spectral term (4 iterations), fwd + bwd':<44} {a:>14.1f} {b:>12.1f} {b / a:>7.2f}")
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    a = _median_ms(lambda: torch.nn.utils.clip_grad_norm_(params, float("inf"), foreach=False), args.repeats)
    b = _median_ms(lambda: torch.nn.utils.clip_grad_norm_(params, float("inf"), foreach=True), args.repeats)
    print(f"{'gradient norm, foreach=True':<44} {a:>14.1f} {b:>12.1f} {b / a:>7.2f}")
    rows = adamax_rows(model, args.repeats, not args.no_compile)
    base = rows["per parameter (nvae train)"]
    for name, ms in rows.items():
        print(f"{'AdaMax, ' + name:<44} {base:>14.1f} {ms:>12.1f} {ms / base:>7.2f}")
    if not args.no_compile:
        for name, a, b in cell_rows(model, args.repeats):
            print(f"{name:<44} {a:>14.1f} {b:>12.1f} {b / a:>7.2f}")
    print(
        "(per layer: as `nvae train` runs it; batched: one op chain per weight shape, or over all parameters; "
        "for the decoder group, eager and compiled)"
    )


if __name__ == "__main__":
    main()
