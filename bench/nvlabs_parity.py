"""The authors' NVAE and ours on the same weights: every released recipe, saved in their format, imported here,
and run side by side with the same input and the same latent noise.

For each recipe it builds the authors' `AutoEncoder` (their train.py's command line for that model, as the
README of their repository gives it, with train.py's defaults for the flags it leaves out) with random weights
and non-trivial BN statistics (random running means and variances, affine weights away from 1 and 0), saves it
as their train.py does (`state_dict`, `args`, `arch_instance`, `epoch`, `global_step`), imports the file with
`model.nvlabs` (what `nvae import-nvlabs` runs) and compares, in eval mode and in train mode (batch
statistics):
  - the decoder's logits, each group's KL and log q / log p, the reconstruction log-likelihood and the ELBO,
    for the same images and the same posterior noise (their `Normal.sample` takes its noise from a queue);
  - prior samples at temperatures 1.0 and 0.7 under the same noise (eval mode).
Targets: float32 rounding, relative error <= 1e-5 on the ELBO and |logits| within 1e-4.

Recipes: mnist, cifar10, celeba_64, imagenet_32, celeba_256 and ffhq are the README's command lines. The
authors also released a multi-scale CIFAR-10 model and an early CelebA HQ 256 model whose command lines they
did not publish: `cifar10_multiscale` (two latent scales, ada_groups) and `celeba_256_24ch` (the README's
smaller 24-channel variant) stand in for them; an imported file's own `args` decide its network either way.

The authors' code is imported at run time from a checkout (`git clone https://github.com/NVlabs/NVAE`, commit
9fc1a28 for the figures in bench/RESULTS.md) with bench/vs_official.py's CPU shims; nothing of it is copied
here. Each recipe runs in its own process (the 256x256 models need a few GB each).

    python bench/nvlabs_parity.py --official /tmp/nvae-official                  # every recipe
    python bench/nvlabs_parity.py --official /tmp/nvae-official --recipes mnist cifar10
    python bench/nvlabs_parity.py --official /tmp/nvae-official --make-testdata tests/data/nvlabs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_COMMON = {
    "arch_instance": "res_mbconv", "num_x_bits": 8, "min_groups_per_scale": 1, "num_mixture_dec": 10,
    "learning_rate": 1e-2, "learning_rate_min": 1e-4, "weight_decay": 3e-4, "warmup_epochs": 5,
    "kl_anneal_portion": 0.3, "kl_const_portion": 1e-4, "kl_const_coeff": 1e-4, "weight_decay_norm": 0.0,
    "weight_decay_norm_init": 10.0, "weight_decay_norm_anneal": False, "fast_adamax": True, "use_se": True,
    "res_dist": True, "ada_groups": False, "num_proc_node": 1, "num_process_per_node": 1, "seed": 1,
    "root": "/tmp/nasvae/expr", "save": "exp", "data": "/tmp/nasvae/data", "cont_training": False,
    "node_rank": 0, "local_rank": 0, "global_rank": 0, "master_address": "127.0.0.1", "distributed": False,
}  # fmt: skip
_SMALL = {"num_preprocess_blocks": 1, "num_postprocess_blocks": 1, "num_preprocess_cells": 2,
          "num_postprocess_cells": 2, "num_cell_per_cond_enc": 2, "num_cell_per_cond_dec": 2,
          "num_latent_per_group": 20}  # fmt: skip
_HQ = {**_SMALL, "num_channels_enc": 30, "num_channels_dec": 30, "num_latent_scales": 5,
       "num_groups_per_scale": 16, "batch_size": 4, "num_nf": 2, "ada_groups": True, "min_groups_per_scale": 4,
       "weight_decay_norm_anneal": True, "weight_decay_norm_init": 1.0, "num_process_per_node": 8,
       "num_proc_node": 3, "num_x_bits": 5}  # fmt: skip
RECIPES: dict[str, dict] = {
    "mnist": {"dataset": "mnist", "batch_size": 200, "epochs": 400, "num_latent_scales": 2,
              "num_groups_per_scale": 10, "num_postprocess_cells": 3, "num_preprocess_cells": 3,
              "num_cell_per_cond_enc": 2, "num_cell_per_cond_dec": 2, "num_latent_per_group": 20,
              "num_preprocess_blocks": 2, "num_postprocess_blocks": 2, "weight_decay_norm": 1e-2,
              "num_channels_enc": 32, "num_channels_dec": 32, "num_nf": 0, "ada_groups": True,
              "num_process_per_node": 2},
    "cifar10": {**_SMALL, "dataset": "cifar10", "num_channels_enc": 128, "num_channels_dec": 128, "epochs": 400,
                "num_latent_scales": 1, "num_groups_per_scale": 30, "batch_size": 32, "weight_decay_norm": 1e-2,
                "num_nf": 1, "num_process_per_node": 8},
    "cifar10_multiscale": {**_SMALL, "dataset": "cifar10", "num_channels_enc": 128, "num_channels_dec": 128,
                           "epochs": 400, "num_latent_scales": 2, "num_groups_per_scale": 30, "ada_groups": True,
                           "batch_size": 32, "weight_decay_norm": 1e-2, "num_nf": 1, "num_process_per_node": 8},
    "celeba_64": {**_SMALL, "dataset": "celeba_64", "num_channels_enc": 64, "num_channels_dec": 64, "epochs": 90,
                  "num_latent_scales": 3, "weight_decay_norm": 1e-1, "num_groups_per_scale": 20, "batch_size": 16,
                  "num_nf": 1, "ada_groups": True, "num_process_per_node": 8},
    "imagenet_32": {**_SMALL, "dataset": "imagenet_32", "num_channels_enc": 192, "num_channels_dec": 192,
                    "epochs": 45, "num_latent_scales": 1, "num_groups_per_scale": 28, "batch_size": 24,
                    "num_nf": 1, "warmup_epochs": 1, "weight_decay_norm": 1e-2, "weight_decay_norm_anneal": True,
                    "weight_decay_norm_init": 1.0, "num_process_per_node": 8, "num_proc_node": 3},
    "celeba_256": {**_HQ, "dataset": "celeba_256", "epochs": 300, "weight_decay_norm": 1e-2},
    "celeba_256_24ch": {**_HQ, "dataset": "celeba_256", "epochs": 300, "weight_decay_norm": 1e-2,
                        "num_channels_enc": 24, "num_channels_dec": 24},
    "ffhq": {**_HQ, "dataset": "ffhq", "epochs": 200, "weight_decay_norm": 1e-1, "learning_rate": 8e-3},
}  # fmt: skip
# A few-MB network in the authors' format for the default test suite (tests/data/nvlabs): the MNIST recipe's
# structure (two scales, ada_groups, one flow pair) at 8 channels.
TESTDATA_RECIPE = {**RECIPES["mnist"], "num_channels_enc": 8, "num_channels_dec": 8, "num_groups_per_scale": 2,
                   "num_latent_per_group": 4, "num_nf": 1, "num_preprocess_blocks": 1, "num_postprocess_blocks": 1,
                   "num_preprocess_cells": 2, "num_postprocess_cells": 2, "num_cell_per_cond_enc": 1,
                   "num_cell_per_cond_dec": 1}  # fmt: skip
ELBO_RTOL, LOGITS_ATOL = 1e-5, 1e-4
STEP_ATOL = 1e-6  # weights after one more optimizer step on each side
# Training images per dataset (their loaders), for the `num_total_iter` their train.py puts in args.
TRAIN_IMAGES = {"mnist": 60_000, "cifar10": 50_000, "celeba_64": 162_770, "imagenet_32": 1_281_167,
                "celeba_256": 27_000, "ffhq": 63_000}  # fmt: skip
BATCH = {"mnist": 4, "cifar10": 4, "cifar10_multiscale": 4, "imagenet_32": 4, "celeba_64": 2}  # else 1


# ------------------------------------------------------------------------------------------ one process


def _authors(checkout: Path):
    """Their modules, with the CPU shims, and with SyncBatchNorm as in their training (the released files
    carry its `.bn.` names); our `model` package stays importable beside their `model` module."""
    import importlib

    import model.network  # noqa: F401  (ours, before their `model` module takes the name)

    ours = {k: v for k, v in sys.modules.items() if k == "model" or k.startswith("model.")}
    for k in ours:
        del sys.modules[k]
    sys.modules.pop("bench.vs_official", None)
    vs = importlib.import_module("bench.vs_official")
    mods = vs.load_official(checkout)
    mods["neural_operations"].SYNC_BN = True
    mods["distributions"] = importlib.import_module("distributions")
    theirs_model = sys.modules["model"]
    sys.modules.update(ours)  # `model` is ours again; theirs stays reachable through `mods`
    mods["model"] = theirs_model
    return mods


def _noise_queue(mods):
    """Their Normal.sample draws from `queue` (shared noise) while it is not empty."""
    queue: list = []
    normal = mods["distributions"].Normal

    def sample(self):
        eps = queue.pop(0) if queue else self.mu.mul(0).normal_()
        return eps * self.sigma + self.mu, eps

    normal.sample = sample
    return queue


def _randomise_bn(net, gen) -> None:
    import torch
    from torch import nn

    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
            m.num_batches_tracked.fill_(1234)
            if m.affine:
                m.weight.data.copy_(1 + 0.2 * torch.randn(c, generator=gen))
                m.bias.data.copy_(0.1 * torch.randn(c, generator=gen))


def _their_optimizer(mods, net, args):
    """Their train.py's optimizer, scheduler and loss scaler for `net` (the fused AdaMax of --fast_adamax)."""
    import torch

    opt = mods["thirdparty.adamax"].Adamax(
        net.parameters(), args.learning_rate, weight_decay=args.weight_decay, eps=1e-3
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, float(args.epochs - args.warmup_epochs - 1), eta_min=args.learning_rate_min
    )
    return opt, sched, torch.amp.GradScaler("cpu", 2**10)


def _their_step(net, opt, scaler, gen) -> dict:
    """One step of their optimizer through their loss scaler, on random gradients (a loss's gradients,
    scaled as their `grad_scalar.scale(loss).backward()` leaves them); returns the gradients by their key."""
    import torch

    names = {id(p): n for n, p in net.named_parameters()}
    grads = {}
    opt.zero_grad()
    scale = scaler.scale(torch.ones(()))  # the factor scale(loss) multiplies a loss by
    for p in net.parameters():
        g = torch.randn(p.shape, generator=gen) * 1e-2
        grads[names[id(p)]] = g
        p.grad = g * scale
    scaler.step(opt)
    scaler.update()
    return grads


def make_authors_checkpoint(mods, values: dict, path: Path, seed: int = 0, steps: int = 2):
    """Their AutoEncoder for `values` (their args), random weights and BN statistics, `steps` steps of their
    optimizer (random gradients), saved in their format with the training state their train.py saves."""
    import torch

    torch.manual_seed(seed)
    args = argparse.Namespace(**{**_COMMON, **values})
    per_process = TRAIN_IMAGES[args.dataset] // (
        args.batch_size * args.num_proc_node * args.num_process_per_node
    )
    args.num_total_iter = per_process * args.epochs  # what their train.py sets before it saves args
    arch = mods["utils"].get_arch_cells(args.arch_instance)
    net = mods["model"].AutoEncoder(args, None, arch)
    with torch.no_grad():
        _randomise_bn(net, torch.Generator().manual_seed(seed + 1))
    opt, sched, scaler = _their_optimizer(mods, net, args)
    gen = torch.Generator().manual_seed(seed + 2)
    for _ in range(steps):
        _their_step(net, opt, scaler, gen)
    payload = {"epoch": 17, "state_dict": net.state_dict(), "optimizer": opt.state_dict(),
               "global_step": 17 * per_process, "args": args, "arch_instance": arch,
               "scheduler": sched.state_dict(), "grad_scalar": scaler.state_dict()}  # fmt: skip
    torch.save(payload, path)
    return net, args


def compare_optimizer(mods, their_net, path: Path, imported, our_net, seed: int = 0) -> dict:
    """Their optimizer, resumed from the file, and ours, from the import's training state, take one step on
    the same gradients: the updated weights (mapped by name) must agree. Also checks that their
    `parameters()` order is the one read off the state dict, which indexes their optimizer's state."""
    import torch

    from model.nvlabs import HEAD_KEYS, their_parameter_order, weight_map
    from training.train import make_optimizer

    payload = torch.load(path, map_location="cpu", weights_only=False)
    wmap = weight_map(our_net.cfg)
    listed = [n for n, _ in their_net.named_parameters()]
    order_ok = listed == their_parameter_order(payload["state_dict"], wmap.aliases)
    args = payload["args"]
    opt_t, _, scaler_t = _their_optimizer(mods, their_net, args)
    opt_t.load_state_dict(payload["optimizer"])
    scaler_t.load_state_dict(payload["grad_scalar"])
    opt_o = make_optimizer(our_net.cfg, our_net)
    opt_o.load_state_dict(imported.training["optimizer"])
    for group in opt_t.param_groups + opt_o.param_groups:
        group["lr"] = args.learning_rate
    grads = _their_step(their_net, opt_t, scaler_t, torch.Generator().manual_seed(seed + 13))
    ours_of = dict(
        (t if t in payload["state_dict"] else t.replace(".bn.", "."), o) for t, o in wmap.pairs
    )  # fmt: skip
    own = dict(our_net.named_parameters())
    opt_o.zero_grad()
    for t, g in grads.items():
        o = ours_of[t]
        own[o].grad = g[wmap.head_order] if wmap.head_order is not None and o in HEAD_KEYS else g.clone()
    opt_o.step()
    theirs_now = dict(their_net.named_parameters())
    worst = 0.0
    for t, o in ours_of.items():
        if t not in theirs_now:
            continue
        w = theirs_now[t].detach()
        w = w[wmap.head_order] if wmap.head_order is not None and o in HEAD_KEYS else w
        worst = max(worst, float((w - own[o].detach()).abs().max()))
    figures = {"order_matches": order_ok, "weights_max_abs": worst,
               "state_entries": len(imported.training["optimizer"]["state"])}  # fmt: skip
    return figures, grads, {t: p.detach().clone() for t, p in theirs_now.items()}


def _inputs(cfg, batch: int, seed: int):
    """Images (B, C, D, D) in [0, 1] on the likelihood's grid: binary for Bernoulli, 2**bits levels else."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shape = (batch, cfg.in_channels, cfg.data_size, cfg.data_size)
    if cfg.likelihood == "bernoulli":
        return (torch.rand(shape, generator=g) < 0.13).float()
    levels = 2**cfg.num_bits - 1
    return torch.randint(0, levels + 1, shape, generator=g).float() / levels


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def compare(mods, their_net, our_net, batch: int, seed: int = 0) -> dict:
    """Side-by-side figures for one network pair (the same weights)."""
    import torch
    import torch.nn.functional as F

    from model.nvlabs import weight_map

    cfg = our_net.cfg
    order = weight_map(cfg).head_order  # their logits in our channel order (an RGB mixture's layout)

    def ours_order(logits):
        return logits if order is None else logits[:, order]

    queue = _noise_queue(mods)
    utils = mods["utils"]
    x = _inputs(cfg, batch, seed)
    x_theirs = F.pad(x, (cfg.pad,) * 4) if cfg.pad else x  # their loaders pad MNIST to 32x32
    out: dict = {}
    for mode in ("eval", "train"):
        g = torch.Generator().manual_seed(seed + 7)
        eps = [torch.randn((batch, *s), generator=g) for s in our_net.latent_shapes()]
        their_net.train(mode == "train")
        our_net.train(mode == "train")
        with torch.no_grad():
            queue[:] = [e.clone() for e in eps]
            logits_t, log_q_t, log_p_t, kl_all_t, _ = their_net(x_theirs)
            assert not queue, "their forward drew fewer samples than there are groups"
            recon_t = utils.reconstruction_loss(
                their_net.decoder_output(logits_t), x_theirs, crop=their_net.crop_output
            )
            o = our_net(x, eps=eps)
            recon_o = our_net.reconstruction_nll(o.logits, x)
        kl_t = torch.stack(kl_all_t, 1)
        kl_o = torch.stack(o.kl_all, 1)
        elbo_t = -(recon_t + kl_t.sum(1))
        elbo_o = -(recon_o + kl_o.sum(1))
        out[mode] = {
            "logits_max_abs": float((ours_order(logits_t) - o.logits).abs().max()),
            "elbo_rel": max(_rel(float(a), float(b)) for a, b in zip(elbo_o, elbo_t, strict=True)),
            "recon_rel": max(_rel(float(a), float(b)) for a, b in zip(recon_o, recon_t, strict=True)),
            "kl_group_rel": float(((kl_o - kl_t).abs() / kl_t.abs().clamp_min(1e-6)).max()),
            "log_q_rel": max(_rel(float(a), float(b)) for a, b in zip(o.log_q, log_q_t, strict=True)),
            "log_p_rel": max(_rel(float(a), float(b)) for a, b in zip(o.log_p, log_p_t, strict=True)),
            "elbo_nats": float(elbo_t.mean()),
            "groups": kl_t.shape[1],
        }
    their_net.eval()
    our_net.eval()
    for t in (1.0, 0.7):
        g = torch.Generator().manual_seed(seed + 11)
        eps = [torch.randn((batch, *s), generator=g) for s in our_net.latent_shapes()]
        with torch.no_grad():
            queue[:] = [e.clone() for e in eps]
            s_t = their_net.sample(batch, t)
            s_o = our_net.sample_logits(batch, t, eps=eps)
        out[f"sample_t{t}"] = {"logits_max_abs": float((ours_order(s_t) - s_o).abs().max())}
    return out


def run_recipe(checkout: Path, name: str, workdir: Path) -> dict:
    import torch

    from model.network import NVAE
    from model.nvlabs import import_nvlabs, load_nvlabs_file

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    mods = _authors(checkout)
    path = workdir / f"{name}.pt"
    t0 = time.perf_counter()
    their_net, _ = make_authors_checkpoint(mods, RECIPES[name], path)
    imported = import_nvlabs(load_nvlabs_file(path), str(path))
    ours = NVAE(imported.config)
    ours.load_state_dict(imported.state)
    figures = compare(mods, their_net, ours, BATCH.get(name, 1))
    figures["optimizer_step"] = compare_optimizer(mods, their_net, path, imported, ours)[0]
    figures.update(
        recipe=name,
        parameters=sum(p.numel() for p in ours.parameters() if p.requires_grad),
        parameters_theirs=sum(
            p.numel() for n, p in their_net.named_parameters() if "weight_normalized" not in n
        ),
        tensors_mapped=len(imported.state),
        file_mb=round(path.stat().st_size / 2**20, 1),
        bn_form=imported.bn_form,
        seconds=round(time.perf_counter() - t0, 1),
    )
    path.unlink()
    checks = [figures[m]["elbo_rel"] <= ELBO_RTOL and figures[m]["logits_max_abs"] <= LOGITS_ATOL
              for m in ("eval", "train")] + [figures[k]["logits_max_abs"] <= LOGITS_ATOL
                                             for k in ("sample_t1.0", "sample_t0.7")]  # fmt: skip
    step = figures["optimizer_step"]
    checks += [step["order_matches"], step["weights_max_abs"] <= STEP_ATOL]
    figures["passed"] = all(checks) and figures["parameters"] == figures["parameters_theirs"]
    return figures


def make_testdata(checkout: Path, dest: Path) -> dict:
    """The default suite's authors'-format file and its recorded figures (fixed inputs and noise)."""
    import torch

    from model.network import NVAE
    from model.nvlabs import import_nvlabs, load_nvlabs_file

    mods = _authors(checkout)
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "tiny-mnist.pt"
    their_net, _ = make_authors_checkpoint(mods, TESTDATA_RECIPE, path, seed=3)
    imported = import_nvlabs(load_nvlabs_file(path), str(path))
    ours = NVAE(imported.config)
    ours.load_state_dict(imported.state)
    # The authors' ELBO on the fixed inputs and noise, per image, eval mode: what the test reproduces.
    import torch.nn.functional as F

    cfg = ours.cfg
    x = _inputs(cfg, 4, 5)
    g = torch.Generator().manual_seed(5 + 7)
    eps = [torch.randn((4, *s), generator=g) for s in ours.latent_shapes()]
    queue = _noise_queue(mods)
    their_net.eval()
    with torch.no_grad():
        queue[:] = [e.clone() for e in eps]
        logits, _, _, kl_all, _ = their_net(F.pad(x, (cfg.pad,) * 4))
        recon = mods["utils"].reconstruction_loss(
            their_net.decoder_output(logits), F.pad(x, (cfg.pad,) * 4), True
        )
        elbo = -(recon + torch.stack(kl_all, 1).sum(1))
    # then side by side (its train-mode pass moves the BN statistics of both networks)
    figures = compare(mods, their_net, ours, batch=4, seed=5)
    # and one more step of their optimizer, resumed from the file, on fixed gradients: the test repeats it
    figures["optimizer_step"], grads, after = compare_optimizer(mods, their_net, path, imported, ours, seed=5)
    torch.save({"x": x, "eps": eps, "grads": grads, "after_step": after, "step_lr": TESTDATA_RECIPE.get(
        "learning_rate", _COMMON["learning_rate"])}, dest / "tiny-mnist-inputs.pt")  # fmt: skip
    record = {
        "file": path.name,
        "inputs": "tiny-mnist-inputs.pt",
        "authors_elbo_nats_eval": [float(v) for v in elbo],
        "sha256": __import__("hashlib").sha256(path.read_bytes()).hexdigest(),
        "made_with": "bench/nvlabs_parity.py --make-testdata (NVlabs/NVAE at 9fc1a28, their AutoEncoder)",
        "parity": figures,
    }
    (dest / "tiny-mnist.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


# ------------------------------------------------------------------------------------------ driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="an NVlabs/NVAE checkout")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "nvlabs_parity")
    parser.add_argument("--make-testdata", type=Path, default=None, help="write the test suite's file there")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.official / "model.py").is_file():
        print(f"nvlabs_parity: error: {args.official} is not an NVlabs/NVAE checkout", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.make_testdata:
        record = make_testdata(args.official, args.make_testdata)
        print(json.dumps(record["parity"], indent=1))
        return 0
    if args.child:
        print(json.dumps(run_recipe(args.official, args.child, args.out)))
        return 0
    rows = []
    for name in args.recipes:
        proc = subprocess.run(
            [sys.executable, __file__, "--official", str(args.official), "--out", str(args.out), "--child", name],
            capture_output=True, text=True,
        )  # fmt: skip
        if proc.returncode:
            print(f"{name}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            rows.append({"recipe": name, "passed": False})
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(_line(row), flush=True)
    result = {
        "date": datetime.date.today().isoformat(),
        "commit": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),  # fmt: skip
        "rows": rows,
    }
    (args.out / "parity.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out / 'parity.json'}")
    return 0 if all(r.get("passed") for r in rows) else 1


def _line(r: dict) -> str:
    e, t = r["eval"], r["train"]
    return (
        f"{r['recipe']:<18} params {r['parameters'] / 1e6:7.2f}M  groups {e['groups']:>3}  "
        f"eval: ELBO rel {e['elbo_rel']:.1e} logits {e['logits_max_abs']:.1e} KL/group rel {e['kl_group_rel']:.1e}  "
        f"train: ELBO rel {t['elbo_rel']:.1e} logits {t['logits_max_abs']:.1e}  "
        f"samples t=1 {r['sample_t1.0']['logits_max_abs']:.1e} t=0.7 {r['sample_t0.7']['logits_max_abs']:.1e}  "
        f"optimizer step {r['optimizer_step']['weights_max_abs']:.1e}  "
        f"{'PASS' if r['passed'] else 'FAIL'} ({r['seconds']} s)"
    )


if __name__ == "__main__":
    sys.exit(main())
