"""The authors' NVAE code and ours, side by side on this machine, alternating rounds; ratios ours / authors'.

Figures (MNIST recipe, fp32, the same thread count, batch and input images for both sides):
  training img/s        median step after warm-up; authors: the loop body of their train.py (forward, recon,
                        balanced KL, spectral and BN terms, backward, their fast AdaMax) with their warm-up lr
                        and KL coefficient; ours: training.train.training_step (Objective, grad norm, AdaMax)
  peak RSS of training  VmHWM of the training process (each measurement runs in its own process)
  BN-readjust iteration one prior sample of batch 16 with train-mode BN under no_grad; authors: what
                        evaluate.py's set_bn repeats (model.train(), model.sample(16, t)); ours: a call of
                        inference.readjust.readjust_bn with READJUST_ITERS iterations, divided by them (a real
                        readjustment runs 500: ours normalises the weights once per call, theirs in every pass)
  eval forward / image  one importance sample of a batch (encoder + decoder, eval-mode BN); authors: one pass of
                        the inner loop of their train.py test(); ours: inference.evaluate.evaluate with k=1
                        over EVAL_BATCHES batches (the weight norm once per call, as over a test set)
  sampling / image      prior sampling at batch 64, t=1, Bernoulli mean; ours: model.prior_sampling.sample_images
                        (with --onnx also onnxruntime, through bench/sampling_speed.py)
Inference figures are the median of --repeats calls after one warm-up call (bench/sampling_speed.py's timer).
With --profile each side's training and evaluation child profiles one more step or call after its timed ones
(torch.profiler; ops' self time by group: convolutions, BN, Swish, the rest) and the table under the ratios
says what bound our convolutions, BN and Swish alone set on the ratio (peak RSS is read before that step).
Both sides run with denormals flushed (ours does it itself; for the authors it is a CPU shim) and with random-init
weights.

The authors' code is imported at run time from a checkout made with `git clone https://github.com/NVlabs/NVAE`
(at commit 9fc1a28 for the figures in bench/RESULTS.md), passed as --official; nothing of it is copied here.
It runs on a CPU through these shims, applied in its process before the model is built:
  .cuda() on tensors and modules is the identity; neural_operations.SYNC_BN = False and SyncBatchNormSwish
  takes the branch the official code takes in a one-process run (F.batch_norm then their Swish): both compute
  what one GPU computes, without a process group; a stub `tensorboardX` when it is not installed (only their
  logging Writer uses it). torch.cuda.amp's autocast and GradScaler disable themselves without CUDA, so the
  authors' step is fp32: loss.backward() then their optimizer's step.

    git clone https://github.com/NVlabs/NVAE /tmp/nvae-official && git -C /tmp/nvae-official checkout 9fc1a28
    python bench/vs_official.py --official /tmp/nvae-official --rounds 2 --steps 3 --out runs/vs_official
    python bench/vs_official.py --official /tmp/nvae-official --quick          # smoke run, under a minute
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.cpu import cpu_flags, cpu_model  # noqa: E402  (after ROOT joins sys.path)

HOW_TO_GET_ONE = (
    "get one with `git clone https://github.com/NVlabs/NVAE /tmp/nvae-official` (then `git -C /tmp/nvae-official "
    "checkout 9fc1a28` for the code behind the published figures) and pass --official /tmp/nvae-official"
)
CHECKOUT_FILES = ("model.py", "utils.py", "neural_operations.py", "thirdparty/adamax.py")

# Presets as data. `authors`: the authors' MNIST command line (the README of their repository) with their
# train.py defaults for the flags it leaves out, as the Namespace their AutoEncoder reads.
PRESETS = {
    "mnist": {
        "ours": "mnist",
        "authors": {
            "dataset": "mnist",
            "num_latent_scales": 2,
            "num_groups_per_scale": 10,
            "num_postprocess_cells": 3,
            "num_preprocess_cells": 3,
            "num_cell_per_cond_enc": 2,
            "num_cell_per_cond_dec": 2,
            "num_latent_per_group": 20,
            "num_preprocess_blocks": 2,
            "num_postprocess_blocks": 2,
            "weight_decay_norm": 1e-2,
            "num_channels_enc": 32,
            "num_channels_dec": 32,
            "num_nf": 0,
            "ada_groups": True,
            "use_se": True,
            "res_dist": True,
            "epochs": 400,
            # train.py's defaults
            "arch_instance": "res_mbconv",
            "num_x_bits": 8,
            "min_groups_per_scale": 1,
            "num_mixture_dec": 10,
            "learning_rate": 1e-2,
            "weight_decay": 3e-4,
            "warmup_epochs": 5,
            "kl_anneal_portion": 0.3,
            "kl_const_portion": 1e-4,
            "kl_const_coeff": 1e-4,
        },
        "train_images": 60_000,
        # stored images (C, H, W); the authors' loader pads them to 32x32, our network pads them itself
        "image": (1, 28, 28),
        "authors_pad": 2,
        "density": 0.13,  # MNIST's mean pixel: the random binarized images have as many ones
    }
}

# (key, row label, goal on ours / authors or None). Smaller is better except for img/s.
FIGURES = [
    ("train_img_per_s", "training img/s (fp32)", (">=", 2.0)),
    ("train_peak_rss_gib", "peak RSS of training, GiB", ("<=", 0.6)),
    ("readjust_ms_per_iter", "BN-readjust iteration (batch 16), ms", ("<=", 0.5)),
    ("eval_ms_per_img", "eval forward (1 IW sample), ms/image", ("<=", 0.5)),
    ("sample_ms_per_img", "prior sampling (batch 64), ms/image", None),
    ("sample_onnx_ms_per_img", "prior sampling (batch 64), ms/image, ours in onnxruntime", None),
]
KINDS = ("train", "readjust", "eval", "sample")  # one process each, per side and round
READJUST_ITERS = 5  # ours: iterations per timed readjust call
EVAL_BATCHES = 3  # ours: batches per timed evaluate call
SIDES = ("authors", "ours")


# ------------------------------------------------------------------------------------------- children


def peak_rss_gib() -> float:
    """This process's peak resident set (VmHWM; ru_maxrss where /proc is missing), GiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _median_call_s(fn, repeats: int) -> float:
    """Seconds: one warm-up call of fn, then the median of `repeats` calls (bench/sampling_speed.py's timer)."""
    return sys.modules["bench.sampling_speed"]._time(fn, repeats)


# Op groups of a profile (`--profile`): ATen ops whose names contain these, plus inductor's compiled kernels
# (ours: the depthwise weight gradient). Autograd functions named after a fused block are not ops and count
# as the rest.
PROFILE_GROUPS = {
    "convolutions": ("conv",),
    "batch norm": ("batch_norm",),
    "Swish (SiLU, sigmoid)": ("silu", "sigmoid"),
}


def profile_split(fn) -> dict[str, float]:
    """One call of fn under torch.profiler: the ops' self CPU seconds per PROFILE_GROUPS group, `rest` (the
    rest of the profiled call's wall time: every other op, Python, the profiler's own cost) and `wall`."""
    from torch.profiler import profile

    t = time.perf_counter()
    with profile() as prof:
        fn()
    wall = time.perf_counter() - t
    out = dict.fromkeys(PROFILE_GROUPS, 0.0)
    for event in prof.key_averages():
        name = event.key.lower()
        for group, keys in PROFILE_GROUPS.items():
            compiled = group == "convolutions" and "compiledfxgraph" in name
            if compiled or (name.startswith("aten::") and any(k in name for k in keys)):
                out[group] += event.self_cpu_time_total / 1e6
                break
    out["rest"] = wall - sum(out.values())
    out["wall"] = wall
    return out


def _per_image(split: dict[str, float], n: int) -> dict[str, float]:
    """A profile's seconds as ms per image (the unit of the evaluation figure)."""
    return {k: 1000 * v / n for k, v in split.items()}


def load_official(checkout: Path) -> dict:
    """Import the authors' modules from `checkout` with the CPU shims of the module docstring applied."""
    import importlib
    import types

    import torch
    import torch.nn.functional as F
    from torch import nn

    sys.path.insert(0, str(checkout))  # before ROOT: their `model` module, not our package
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        stub = types.ModuleType("tensorboardX")
        stub.SummaryWriter = object
        sys.modules["tensorboardX"] = stub
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self
    mods = {
        name: importlib.import_module(name)
        for name in (
            "neural_operations",
            "thirdparty.inplaced_sync_batchnorm",
            "utils",
            "model",
            "thirdparty.adamax",
        )
    }
    for name, mod in mods.items():
        if not Path(mod.__file__).resolve().is_relative_to(checkout.resolve()):
            raise ImportError(f"{name} was imported from {mod.__file__}, not from the checkout {checkout}")
    mods["neural_operations"].SYNC_BN = False
    isbn = mods["thirdparty.inplaced_sync_batchnorm"]

    def one_process_forward(self, input):
        # the branch SyncBatchNormSwish.forward takes when the world size is 1
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked = self.num_batches_tracked + 1
            if self.momentum is None:
                momentum = 1.0 / self.num_batches_tracked.item()
        use_batch_stats = self.training or not self.track_running_stats
        out = F.batch_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
        )
        return isbn.swish.apply(out)

    isbn.SyncBatchNormSwish.forward = one_process_forward
    return mods


def _images(spec: dict):
    import torch

    return torch.load(spec["data"])


def _authors_model(spec: dict):
    import torch

    mods = load_official(Path(spec["official"]))
    args = argparse.Namespace(**PRESETS[spec["preset"]]["authors"], batch_size=spec["batch"])
    torch.manual_seed(0)
    model = mods["model"].AutoEncoder(args, None, mods["utils"].get_arch_cells(args.arch_instance))
    return model, args, mods


def authors_child(kind: str, spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_flush_denormal(True)
    model, args, mods = _authors_model(spec)
    utils = mods["utils"]
    pad = PRESETS[spec["preset"]]["authors_pad"]
    images = [F.pad(x, (pad, pad, pad, pad)) for x in _images(spec)]  # their loader's Pad(2)
    res = {"params": sum(p.numel() for p in model.parameters())}
    if kind == "train":
        model.train()
        opt = mods["thirdparty.adamax"].Adamax(
            model.parameters(), args.learning_rate, weight_decay=args.weight_decay, eps=1e-3
        )
        alpha_i = utils.kl_balancer_coeff(
            num_scales=model.num_latent_scales, groups_per_scale=model.groups_per_scale, fun="square"
        )
        per_epoch = PRESETS[spec["preset"]]["train_images"] // spec["batch"]
        total, warmup_iters = per_epoch * args.epochs, per_epoch * args.warmup_epochs

        def one_step(step: int) -> torch.Tensor:
            x = images[step % len(images)]
            # train.py's train(), one iteration (CPU: autocast and GradScaler are disabled, world size 1)
            x = utils.pre_process(x, args.num_x_bits)
            if step < warmup_iters:
                for group in opt.param_groups:
                    group["lr"] = args.learning_rate * float(step) / warmup_iters
            opt.zero_grad()
            logits, log_q, log_p, kl_all, kl_diag = model(x)
            output = model.decoder_output(logits)
            kl_coeff = utils.kl_coeff(
                step, args.kl_anneal_portion * total, args.kl_const_portion * total, args.kl_const_coeff
            )
            recon_loss = utils.reconstruction_loss(output, x, crop=model.crop_output)
            balanced_kl, _, _ = utils.kl_balancer(kl_all, kl_coeff, kl_balance=True, alpha_i=alpha_i)
            loss = torch.mean(recon_loss + balanced_kl)
            norm_loss = model.spectral_norm_parallel()
            bn_loss = model.batchnorm_loss()
            loss += norm_loss * args.weight_decay_norm + bn_loss * args.weight_decay_norm
            loss.backward()
            utils.average_gradients(model.parameters(), False)
            opt.step()
            return loss

        times = []
        for step in range(spec["warmup"] + spec["steps"]):
            t = time.perf_counter()
            loss = one_step(step)
            if step >= spec["warmup"]:
                times.append(time.perf_counter() - t)
        res["train_peak_rss_gib"] = peak_rss_gib()  # before a profiled step, whose records take memory
        if spec.get("profile"):
            res["profile_train"] = profile_split(lambda: one_step(spec["warmup"] + spec["steps"]))
        res["step_s"], res["step_times_s"] = statistics.median(times), times
        res["train_img_per_s"] = spec["batch"] / res["step_s"]
        res["loss"] = loss.item()
    elif kind == "readjust":
        model.train()  # evaluate.py's set_bn: the whole model in train mode, under no_grad
        with torch.no_grad():
            res["readjust_ms_per_iter"] = 1000 * _median_call_s(
                lambda: model.sample(16, 1.0), spec["repeats"]
            )
    elif kind == "eval":
        model.eval()
        x = utils.pre_process(images[0], args.num_x_bits)

        def one_iw_sample():  # the body of train.py test()'s loop over samples, once
            logits, log_q, log_p, kl_all, _ = model(x)
            output = model.decoder_output(logits)
            recon_loss = utils.reconstruction_loss(output, x, crop=model.crop_output)
            balanced_kl, _, _ = utils.kl_balancer(kl_all, kl_balance=False)
            nelbo = recon_loss + balanced_kl
            log_iw = utils.log_iw(output, x, log_q, log_p, crop=model.crop_output)
            return nelbo, torch.logsumexp(torch.stack([log_iw], dim=1), dim=1)

        with torch.no_grad():
            res["eval_ms_per_img"] = 1000 * _median_call_s(one_iw_sample, spec["repeats"]) / x.size(0)
            if spec.get("profile"):
                res["profile_eval"] = _per_image(profile_split(one_iw_sample), x.size(0))
    elif kind == "sample":
        model.eval()
        n = spec["sample_batch"]
        with torch.no_grad():
            s = _median_call_s(lambda: model.decoder_output(model.sample(n, 1.0)).mean, spec["repeats"])
        res["sample_ms_per_img"] = 1000 * s / n
    return res


def ours_child(kind: str, spec: dict) -> dict:
    import torch

    from model.config import apply_overrides, get_preset
    from model.network import NVAE
    from model.precision import configure_cpu

    configure_cpu()  # as `nvae train` and the inference commands on CPU
    cfg = apply_overrides(get_preset(PRESETS[spec["preset"]]["ours"]), {"batch_size": spec["batch"]})
    if kind == "sample_onnx":
        import tempfile

        from bench.sampling_speed import bench_preset

        preset = PRESETS[spec["preset"]]["ours"]
        with tempfile.TemporaryDirectory() as tmp:
            rows, export_s, _ = bench_preset(
                preset, [spec["sample_batch"]], spec["repeats"], "cpu", False, "dynamo", Path(tmp)
            )
        return {"sample_onnx_ms_per_img": rows[0][3], "onnx_export_s": export_s}
    torch.manual_seed(0)
    model = NVAE(cfg).to(memory_format=torch.channels_last)  # CPU default of training and inference
    images = _images(spec)
    res = {"params": sum(p.numel() for p in model.parameters())}
    if kind == "train":
        from training.train import Objective, learning_rate, make_optimizer, training_step

        objective = Objective(model)
        opt = make_optimizer(cfg, model)
        scaler = torch.amp.GradScaler("cpu", enabled=False)  # fp32: the scaler is a pass-through
        per_epoch = PRESETS[spec["preset"]]["train_images"] // spec["batch"]
        total = per_epoch * cfg.epochs

        def one_step(step: int):  # the step `nvae train` takes (the lr schedule, then training_step)
            x = images[step % len(images)]
            lr = learning_rate(cfg, step, total, per_epoch)
            return training_step(objective, opt, scaler, iter([x]), step, total, lr, channels_last=True)

        times = []
        for step in range(spec["warmup"] + spec["steps"]):
            t = time.perf_counter()
            result = one_step(step)
            if step >= spec["warmup"]:
                times.append(time.perf_counter() - t)
        res["train_peak_rss_gib"] = peak_rss_gib()  # before a profiled step, whose records take memory
        if spec.get("profile"):
            res["profile_train"] = profile_split(lambda: one_step(spec["warmup"] + spec["steps"]))
        res["step_s"], res["step_times_s"] = statistics.median(times), times
        res["train_img_per_s"] = spec["batch"] / res["step_s"]
        res["loss"] = result.terms.loss.item()
    elif kind == "readjust":
        from inference.readjust import readjust_bn

        def iterations():
            readjust_bn(model, 1.0, iters=READJUST_ITERS, batch=16, progress=False)

        res["readjust_ms_per_iter"] = 1000 * _median_call_s(iterations, spec["repeats"]) / READJUST_ITERS
    elif kind == "eval":
        from inference.evaluate import evaluate

        model.eval()
        batches = [images[0]] * EVAL_BATCHES
        s = _median_call_s(lambda: evaluate(model, batches, 1, chunk=1, progress=False), spec["repeats"])
        n = sum(x.size(0) for x in batches)
        res["eval_ms_per_img"] = 1000 * s / n
        if spec.get("profile"):
            split = profile_split(lambda: evaluate(model, batches, 1, chunk=1, progress=False))
            res["profile_eval"] = _per_image(split, n)
    elif kind == "sample":
        from model.prior_sampling import sample_images

        model.eval()
        n = spec["sample_batch"]
        s = _median_call_s(lambda: sample_images(model, n, 1.0, 0, "mean", batch_size=n), spec["repeats"])
        res["sample_ms_per_img"] = 1000 * s / n
    return res


def run_child(side: str, kind: str, spec: dict) -> dict:
    import torch

    import bench.sampling_speed  # noqa: F401  (its timer; imported before the authors' checkout joins sys.path)

    torch.set_num_threads(spec["threads"])
    res = authors_child(kind, spec) if side == "authors" else ours_child(kind, spec)
    res["peak_rss_gib"] = peak_rss_gib()
    if kind == "train":
        res.setdefault("train_peak_rss_gib", res["peak_rss_gib"])
    res["threads"] = torch.get_num_threads()
    return res


# ------------------------------------------------------------------------------------------- parent


def check_checkout(path: str | None) -> str | None:
    """None when `path` looks like an NVlabs/NVAE checkout, else the one line to print."""
    if not path:
        return "no NVlabs/NVAE checkout given (--official): " + HOW_TO_GET_ONE
    missing = [f for f in CHECKOUT_FILES if not (Path(path) / f).is_file()]
    if missing:
        return (
            f"--official {path} is not an NVlabs/NVAE checkout (no {', '.join(missing)}): " + HOW_TO_GET_ONE
        )
    return None


def machine() -> dict:
    """CPU model, AVX-512 or not, cores, load: what makes figures comparable or not."""
    flags = cpu_flags()
    info = {"cpu": cpu_model(), "avx512": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags}
    info["cores"] = len(os.sched_getaffinity(0))
    info["loadavg_start"] = os.getloadavg()
    return info


def git_head(path: Path) -> str | None:
    """The commit checked out at `path` (None when it is no git work tree, e.g. an unpacked archive)."""
    proc = subprocess.run(
        ["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def make_images(preset: str, batch: int, n: int, path: Path) -> None:
    """n batches (B, C, H, W) of seeded random binarized images, saved for both sides to load."""
    import torch

    p = PRESETS[preset]
    g = torch.Generator().manual_seed(0)
    batches = [torch.bernoulli(torch.full((batch, *p["image"]), p["density"]), generator=g) for _ in range(n)]
    torch.save(batches, path)


def meets(ratio: float, goal) -> bool:
    op, value = goal
    return ratio >= value if op == ">=" else ratio <= value


def summarize(records: list[dict]) -> dict:
    """Child records ({round, side, figure keys...}) -> per figure: each side's median over rounds, the ratio
    of the medians (ours / authors), the ratio of each round's pair, and the goal."""
    values: dict[tuple[str, str], dict[int, float]] = {}
    for rec in records:
        for key, _, _ in FIGURES:
            if key in rec:
                values.setdefault((rec["side"], key), {})[rec["round"]] = rec[key]
    out = {}
    for key, label, goal in FIGURES:
        # the authors have no onnxruntime path: our ORT sampling is held against their eager sampling
        theirs = values.get(("authors", "sample_ms_per_img" if key == "sample_onnx_ms_per_img" else key), {})
        ours = values.get(("ours", key), {})
        if not theirs or not ours:
            continue
        row = {
            "label": label,
            "authors": statistics.median(theirs.values()),
            "ours": statistics.median(ours.values()),
        }
        row["ratio"] = row["ours"] / row["authors"]
        row["ratio_per_round"] = [ours[r] / theirs[r] for r in sorted(theirs) if r in ours]
        row["authors_per_round"], row["ours_per_round"] = theirs, ours
        if goal:
            row["goal"] = f"{goal[0]} {goal[1]}x"
            row["met"] = meets(row["ratio"], goal)
        out[key] = row
    return out


def table(summary: dict) -> str:
    lines = ["| figure | authors | ours | ratio (ours / authors) | goal |", "|---|---:|---:|---:|---|"]
    for row in summary.values():
        rounds = " ".join(f"{r:.2f}" for r in row["ratio_per_round"])
        goal = f"{row['goal']} ({'met' if row['met'] else 'not met'})" if "goal" in row else "-"
        lines.append(
            f"| {row['label']} | {row['authors']:.2f} | {row['ours']:.2f} | {row['ratio']:.2f}x "
            f"(rounds: {rounds}) | {goal} |"
        )
    return "\n".join(lines)


PROFILED = {
    "train": ("training", "step_s", "s per training step"),
    "eval": ("evaluation", "eval_ms_per_img", "ms per image"),
}


def profile_table(records: list[dict]) -> str:
    """Per profiled kind, each side's median seconds per op group over rounds, and the bound they set: the
    authors' measured figure over our convolutions, BN and Swish alone (the ratio if nothing else of ours took
    time; for training in img/s, so the same direction as the figure's goal)."""
    lines = []
    for kind, (name, figure, unit) in PROFILED.items():
        key = f"profile_{kind}"
        sides = {side: [r[key] for r in records if r.get("side") == side and key in r] for side in SIDES}
        if not all(sides.values()):
            continue
        med = {side: {g: statistics.median(p[g] for p in ps) for g in ps[0]} for side, ps in sides.items()}
        lines += [
            f"Where the time goes, {name} ({unit}, profiled call, median over rounds):",
            "| op group | authors | ours |",
            "|---|---:|---:|",
        ]
        lines += [f"| {g} | {med['authors'][g]:.3f} | {med['ours'][g]:.3f} |" for g in med["ours"]]
        floor = sum(med["ours"][g] for g in PROFILE_GROUPS)
        theirs = statistics.median(
            r[figure] for r in records if r.get("side") == "authors" and r.get("kind") == kind and figure in r
        )
        bound = theirs / floor if kind == "train" else floor / theirs
        what = "img/s" if kind == "train" else "time"
        lines.append(
            f"bound: with nothing but our convolutions, BN and Swish, {name} would be {bound:.2f}x the authors' "
            f"{what} (their unprofiled figure {theirs:.3f}, our three groups {floor:.3f})"
        )
        lines.append("")
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", help="path of an NVlabs/NVAE checkout (the authors' code)")
    ap.add_argument("--preset", default="mnist", choices=sorted(PRESETS))
    ap.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds: authors, ours, authors, ours..."
    )
    ap.add_argument("--steps", type=int, default=10, help="timed training steps (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    ap.add_argument("--batch", type=int, default=32, help="training and evaluation batch")
    ap.add_argument("--sample-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per inference figure (median)")
    ap.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads, both sides"
    )
    ap.add_argument("--only", nargs="+", choices=KINDS, default=list(KINDS), help="measure only these")
    ap.add_argument(
        "--onnx",
        action="store_true",
        help="also time our onnxruntime sampler (exports once a round; onnxruntime picks its own threads)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also profile one more training step and evaluation call per side: where the time goes, by op group",
    )
    ap.add_argument("--out", help="folder for vs_official.json (every figure, per round, and the ratios)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1+1 steps, 1 repeat")
    ap.add_argument("--_child", nargs=3, metavar=("SIDE", "KIND", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        side, kind, spec = args._child
        print(json.dumps(run_child(side, kind, json.loads(spec))))
        return 0
    problem = check_checkout(args.official)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.quick:
        args.rounds, args.steps, args.warmup, args.repeats = 1, 1, 1, 1
    import tempfile

    import torch

    info = machine()
    started = datetime.datetime.now(datetime.UTC)
    print(
        f"{info['cpu']} (AVX-512: {'yes' if info['avx512'] else 'no'}), {info['cores']} cores, torch "
        f"{torch.__version__}, {args.threads} threads, load {info['loadavg_start'][0]:.2f}; preset {args.preset}, "
        f"batch {args.batch}, {args.rounds} rounds, {args.steps} steps after {args.warmup} warm-up, "
        f"{args.repeats} repeats",
        flush=True,
    )
    kinds = [k for k in KINDS if k in args.only] + (["sample_onnx"] if args.onnx else [])
    records = []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "images.pt"
        make_images(args.preset, args.batch, max(1, min(args.warmup + args.steps, 8)), data)
        spec = {
            "official": str(Path(args.official).resolve()),
            "preset": args.preset,
            "batch": args.batch,
            "sample_batch": args.sample_batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "threads": args.threads,
            "data": str(data),
            "profile": args.profile,
        }
        for r in range(1, args.rounds + 1):
            for kind in kinds:
                for side in SIDES:
                    if kind == "sample_onnx" and side == "authors":
                        continue
                    t = time.perf_counter()
                    cmd = [sys.executable, __file__, "--_child", side, kind, json.dumps(spec)]
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
                    wall = time.perf_counter() - t
                    if proc.returncode:
                        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
                        print(f"round {r} {kind:9s} {side:7s}: FAILED ({wall:.0f} s): {tail}", flush=True)
                        records.append({"round": r, "kind": kind, "side": side, "error": proc.stderr[-4000:]})
                        continue
                    res = json.loads(proc.stdout.strip().splitlines()[-1])
                    records.append({"round": r, "kind": kind, "side": side, "wall_s": wall, **res})
                    shown = [f"{key} {res[key]:.2f}" for key, _, _ in FIGURES if key in res]
                    print(f"round {r} {kind:9s} {side:7s}: {', '.join(shown)} ({wall:.0f} s)", flush=True)
    params = {rec["side"]: rec["params"] for rec in records if "params" in rec}
    if len(set(params.values())) > 1:
        print(f"WARNING: the two models differ in size: {params}", flush=True)
    summary = summarize(records)
    info["loadavg_end"] = os.getloadavg()
    print()
    print(table(summary))
    if args.profile:
        print()
        print(profile_table(records))
    print(f"(parameters: {params}; load average at the end {info['loadavg_end'][0]:.2f})")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        doc = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": started.isoformat(timespec="seconds"),
            "machine": info,
            "torch": torch.__version__,
            "settings": {k: v for k, v in vars(args).items() if k != "_child"},
            "project_commit": git_head(ROOT),
            "official_commit": git_head(Path(args.official)),
            "params": params,
            "summary": summary,
            "runs": records,
        }
        (out / "vs_official.json").write_text(json.dumps(doc, indent=1))
        print(f"wrote {out / 'vs_official.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
