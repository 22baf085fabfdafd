"""Training parity with the authors' code, step by step: the same start, the same batches, the same noise.

Both sides train the same network from the same weights. The authors' `AutoEncoder`, freshly built under a seed,
is saved in their format and imported with `model.nvlabs` (what `nvae import-nvlabs` runs). Their side runs
their own train.py `train()` one batch at a time: their loop, KL warm-up and balancing, spectral and BN terms,
and their fused AdaMax. Our side runs `training.train.training_step`, the step `nvae train` takes, with our
schedule (`training.train.learning_rate`) and our `Objective`.

Shared:
  - the batches: Fashion-MNIST training images (the embedded dataset, raw idx files), in a seeded order,
    binarized by one seeded Bernoulli draw per pixel (their `Binarize`; our loaders' `x > u` is the same
    law). Their loader pads 28x28 to 32x32; ours pads inside the network;
  - the posterior noise: their `Normal.sample` takes its noise from a queue, ours takes `eps`; with
    --own-noise, our network draws it itself instead (`Normal.sample` without eps, the path of `nvae train`),
    and their side is given what ours drew;
  - the power-iteration vectors of the spectral term: theirs start from our initial ones. As on both sides
    by default, the first step runs 10x the iterations.
Not shared: nothing else draws random numbers in a step.

Reported per step and side: loss, reconstruction, KL (total and per group), KL coefficient, lr, the spectral
and BN terms, the spectral coefficient and the gradient norm (before the update). Checks:
  - the first --first steps agree to float32 rounding (relative difference <= FIRST_RTOL on every figure);
  - over --steps steps and --seeds seeds: the mean curves per window of --window steps, each side's spread
    across seeds, and the difference of the means against that spread.

The authors' code comes from a checkout (`git clone https://github.com/NVlabs/NVAE`, commit 9fc1a28 for the
figures in bench/RESULTS.md), imported at run time with bench/vs_official.py's CPU shims; its `datasets` and
`fid` modules, which `train()` does not use, are replaced by empty modules (they need scipy and lmdb).

    python bench/train_parity.py --official /tmp/nvae-official --first 5 --steps 0          # the first steps
    python bench/train_parity.py --official /tmp/nvae-official --steps 300 --seeds 3 --json out.json
    python bench/train_parity.py --official /tmp/nvae-official --own-noise --steps 683 --seeds 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FIRST_RTOL = 1e-4  # float32 rounding through a few steps of a 4M-parameter network (measured: ~1e-6)
FIELDS = ("loss", "recon", "kl", "kl_coeff", "lr", "spectral", "bn", "sr_coeff", "grad_norm")
# The network of the equal-budget comparison (3,956,574 parameters): the MNIST recipe at 16 channels, 2 scales of
# 4 groups (ada_groups: 4 and 2), one flow pair; batch 32, lr 1e-2 constant, KL warm-up over 30 % of the run, fp32.
# --groups 2 gives a 2,051,550-parameter variant (2 and 1 groups) at half the time per step.
NETWORK = {"num_channels_enc": 16, "num_channels_dec": 16, "num_latent_scales": 2, "num_groups_per_scale": 4,
           "ada_groups": True, "min_groups_per_scale": 1, "num_nf": 1, "batch_size": 32,
           "learning_rate": 1e-2, "learning_rate_min": 1e-2, "warmup_epochs": 0}  # fmt: skip


# ------------------------------------------------------------------------------------------ their side
def _their_train_module(mods):
    """Their train.py as a module (its `train()`), with `model` naming their module while it imports."""
    import importlib

    stubs = {"datasets": (), "fid": (), "fid.inception": ("InceptionV3",),
             "fid.fid_score": ("compute_statistics_of_generator", "load_statistics", "calculate_frechet_distance")}  # fmt: skip
    for name, attrs in stubs.items():
        if name not in sys.modules:
            module = types.ModuleType(name)
            for attr in attrs:
                setattr(module, attr, None)
            sys.modules[name] = module
    ours = sys.modules["model"]
    sys.modules["model"] = mods["model"]
    try:
        return importlib.import_module("train")
    finally:
        sys.modules["model"] = ours


class _Recorder:
    """What their `train()` computes in one step, caught where it is computed: their utils functions (wrapped
    once per process) and this network's and optimizer's methods record into `step`."""

    current: _Recorder | None = None

    def __init__(self, mods, net, opt):
        self.step: dict = {}
        _Recorder.current = self
        utils = mods["utils"]
        if not getattr(utils, "_parity_wrapped", False):
            kl_coeff, recon, balancer = utils.kl_coeff, utils.reconstruction_loss, utils.kl_balancer

            def record_kl_coeff(*a, **k):
                value = kl_coeff(*a, **k)
                _Recorder.current.step.setdefault("kl_coeff", float(value))
                return value

            def record_recon(*a, **k):
                value = recon(*a, **k)
                _Recorder.current.step.setdefault("recon", float(value.detach().mean()))
                return value

            def record_balancer(kl_all, *a, **k):
                out = balancer(kl_all, *a, **k)
                groups = [float(v) for v in out[2]]
                _Recorder.current.step.setdefault("kl_groups", groups)
                _Recorder.current.step.setdefault("kl", sum(groups))
                return out

            utils.kl_coeff, utils.reconstruction_loss = record_kl_coeff, record_recon
            utils.kl_balancer, utils._parity_wrapped = record_balancer, True
        spectral, bn, adamax_step = net.spectral_norm_parallel, net.batchnorm_loss, opt.step

        def record_spectral():
            value = spectral()
            self.step["spectral"] = float(value)
            return value

        def record_bn():
            value = bn()
            self.step["bn"] = float(value)
            return value

        def record_adamax_step(*a, **k):
            import torch

            grads = [
                p.grad.detach() for group in opt.param_groups for p in group["params"] if p.grad is not None
            ]
            self.step["grad_norm"] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
            self.step["lr"] = float(opt.param_groups[0]["lr"])
            return adamax_step(*a, **k)

        net.spectral_norm_parallel, net.batchnorm_loss, opt.step = (
            record_spectral,
            record_bn,
            record_adamax_step,
        )


class _Scaler:
    """Their `grad_scalar` at fp32 (torch's GradScaler is a pass-through without CUDA): records the loss."""

    def __init__(self, recorder: _Recorder):
        self.recorder = recorder

    def scale(self, loss):
        self.recorder.step["loss"] = float(loss.detach())
        return loss

    def step(self, opt):
        opt.step()

    def update(self):
        pass


class _Quiet:
    def __getattr__(self, name):
        return lambda *a, **k: None


class Theirs:
    def __init__(self, mods, net, args, total_steps: int, warmup_iters: int):
        self.train_py = _their_train_module(mods)
        self.train_py.args = args  # train() reads the module's global `args`, as when train.py runs
        self.net, self.args, self.warmup_iters = net, args, warmup_iters
        self.opt = mods["thirdparty.adamax"].Adamax(
            net.parameters(), args.learning_rate, weight_decay=args.weight_decay, eps=1e-3
        )
        self.recorder = _Recorder(mods, net, self.opt)
        self.scaler = _Scaler(self.recorder)
        self.global_step = 0
        args.num_total_iter = total_steps

    def step(self, x_padded, queue, eps=None) -> dict:
        """One call of their train() on one batch; with `eps`, their posterior noise (else they draw it)."""
        import numpy as np

        self.recorder.step = {}
        queue[:] = [e.clone() for e in eps] if eps is not None else []
        # Their first spectral_norm_parallel iterates 10x only on vectors it draws itself; given ours, do the same.
        first = self.global_step == 0 and bool(self.net.sr_u)
        if first:
            self.net.num_power_iter *= 10
        _, self.global_step = self.train_py.train(
            [(x_padded, None)],
            self.net,
            self.opt,
            self.scaler,
            self.global_step,
            self.warmup_iters,
            _Quiet(),
            _Quiet(),
        )
        if first:
            self.net.num_power_iter //= 10
        assert not queue, "their forward drew fewer samples than there are groups"
        rec = self.recorder.step
        a = self.args
        if a.weight_decay_norm_anneal:
            c = rec["kl_coeff"]
            rec["sr_coeff"] = float(
                np.exp((1 - c) * np.log(a.weight_decay_norm_init) + c * np.log(a.weight_decay_norm))
            )
        else:
            rec["sr_coeff"] = float(a.weight_decay_norm)
        return rec


# ------------------------------------------------------------------------------------------- our side
class Ours:
    def __init__(self, net, total_steps: int, batches_per_epoch: int):
        import torch

        from training.train import Objective, make_optimizer

        self.net, self.cfg = net, net.cfg
        self.objective = Objective(net)
        self.opt = make_optimizer(self.cfg, net)
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.total, self.per_epoch, self.step_no = total_steps, batches_per_epoch, 0
        self.eps: list = []
        forward = type(net).forward

        def with_shared_noise(x, eps=None):
            return forward(net, x, eps=self.eps.pop(0) if self.eps else eps)

        net.forward = with_shared_noise

    def step(self, x, eps=None, drawn: list | None = None) -> dict:
        """One `training_step` on one batch; with `eps`, its posterior noise (else the network draws it, and
        with `drawn`, the noise it drew is appended there, group by group, as contiguous tensors)."""
        import torch

        from model import distributions
        from training.train import learning_rate, training_step

        self.eps = [list(eps)] if eps is not None else []
        lr = learning_rate(self.cfg, self.step_no, self.total, self.per_epoch)
        sample = distributions.Normal.sample
        if drawn is not None:  # the network's own draw (`torch.randn_like` in Normal.sample), recorded

            def recording(normal, given=None):
                assert given is None, "recording our own noise, but the forward was given eps"
                noise = torch.randn_like(normal.mu)
                drawn.append(noise.detach().contiguous().clone())
                return sample(normal, noise)

            distributions.Normal.sample = recording
        try:
            result = training_step(self.objective, self.opt, self.scaler, iter([x]), self.step_no, self.total, lr,
                                   channels_last=True)  # fmt: skip
        finally:
            distributions.Normal.sample = sample
        assert not self.eps, "our forward did not take the shared noise"
        self.step_no += 1
        t = result.terms
        groups = [float(v) for v in t.kl_groups]
        return {"loss": float(t.loss), "recon": float(t.recon.mean()), "kl": sum(groups), "kl_groups": groups,
                "kl_coeff": float(t.beta), "lr": lr, "spectral": float(t.spectral), "bn": float(t.bn),
                "sr_coeff": float(t.lam), "grad_norm": float(result.grad_norm)}  # fmt: skip


# ---------------------------------------------------------------------------------------------- a pair
def _share_sr_vectors(their_net, our_net, wmap) -> int:
    """Their power-iteration vectors (a dict per weight shape, in their conv order) from our buffers."""
    import torch

    ours_of = dict(wmap.pairs)
    their_names = {id(m): n for n, m in their_net.named_modules()}
    spectral = our_net.spectral
    where = {name: (k, i) for k, names in enumerate(spectral.group_names) for i, name in enumerate(names)}
    members: dict = {}
    for conv in their_net.all_conv_layers:
        key = their_names[id(conv)] + ".weight"
        ours = ours_of.get(key) or ours_of[key.replace(".bn.", ".")]
        k, i = where[ours.rsplit(".", 1)[0]]
        shape = torch.Size([conv.weight.size(0), conv.weight[0].numel()])
        members.setdefault(shape, []).append((k, i))
    for shape, at in members.items():
        their_net.sr_u[shape] = torch.stack([getattr(spectral, f"u_{k}")[i] for k, i in at]).clone()
        their_net.sr_v[shape] = torch.stack([getattr(spectral, f"v_{k}")[i] for k, i in at]).clone()
    return sum(len(at) for at in members.values())


def fashion_mnist(limit: int | None = None):
    import torch

    from data.sources import read_idx_source

    source = read_idx_source(FASHION_MNIST, limit)
    images = next(iter(source.splits["train"])).load()
    return torch.from_numpy(images.copy()).float().div_(255).reshape(-1, 1, 28, 28)


def batches(images, batch: int, steps: int, seed: int):
    """`steps` batches of `images` in a seeded order (a new permutation each epoch), binarized by a seeded
    Bernoulli draw per pixel."""
    import torch

    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        while len(order) < batch:
            order += torch.randperm(images.size(0), generator=g).tolist()
        idx, order = order[:batch], order[batch:]
        x = images[idx]
        yield (torch.rand(x.shape, generator=g) < x).float()


def imported_weights(mods, their_net, args, workdir: Path):
    """Their network's weights as ours: saved in their format and imported by `model.nvlabs` (`Imported`)."""
    import torch

    from model.nvlabs import import_nvlabs, load_nvlabs_file

    path = workdir / "theirs.pt"
    torch.save({"epoch": 0, "state_dict": their_net.state_dict(), "args": args, "global_step": 0,
                "arch_instance": mods["utils"].get_arch_cells(args.arch_instance)}, path)  # fmt: skip
    try:
        return import_nvlabs(load_nvlabs_file(path), str(path), training=False)
    finally:
        path.unlink()


def run_pair(
    mods, queue, seed: int, steps: int, values: dict, workdir: Path, images, own_noise: bool = False
) -> dict:
    """One seed on both sides in lockstep; `mods` and `queue` from `bench.nvlabs_parity` (once a process).
    With `own_noise`, our network draws its posterior noise itself (`Normal.sample` without eps, from the global
    generator, seeded each step from the seed's stream) and the authors' side is given that noise."""
    import torch
    import torch.nn.functional as F

    from bench.nvlabs_parity import _COMMON
    from model.network import NVAE
    from model.nvlabs import weight_map

    args = argparse.Namespace(**{**_COMMON, **values})
    torch.manual_seed(seed)
    their_net = mods["model"].AutoEncoder(args, None, mods["utils"].get_arch_cells(args.arch_instance))
    per_epoch = 60_000 // args.batch_size
    args.num_total_iter = steps
    imported = imported_weights(mods, their_net, args, workdir)
    torch.manual_seed(seed + 1)  # our spectral vectors' first draw
    our_net = NVAE(imported.config).to(memory_format=torch.channels_last)  # as `nvae train` on CPU
    missing = our_net.load_state_dict(imported.state, strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    shared = _share_sr_vectors(their_net, our_net, weight_map(our_net.cfg))
    theirs = Theirs(mods, their_net, args, steps, int(args.warmup_epochs * per_epoch))
    ours = Ours(our_net, steps, per_epoch)
    noise = torch.Generator().manual_seed(seed + 2)
    pad = our_net.cfg.pad
    records = {"theirs": [], "ours": [], "seconds": {"theirs": 0.0, "ours": 0.0}}
    for x in batches(images, args.batch_size, steps, seed + 3):
        if own_noise:  # ours draws its posterior noise itself; theirs is given what ours drew
            torch.manual_seed(int(torch.randint(2**62, (), generator=noise)))
            t0, eps = time.perf_counter(), []
            records["ours"].append(ours.step(x, drawn=eps))
            t1 = time.perf_counter()
            records["theirs"].append(theirs.step(F.pad(x, (pad,) * 4), queue, eps))
            records["seconds"]["ours"] += t1 - t0
            records["seconds"]["theirs"] += time.perf_counter() - t1
            continue
        eps = [torch.randn((x.size(0), *s), generator=noise) for s in our_net.latent_shapes()]
        t0 = time.perf_counter()
        records["theirs"].append(theirs.step(F.pad(x, (pad,) * 4), queue, eps))
        t1 = time.perf_counter()
        records["ours"].append(ours.step(x, eps))
        records["seconds"]["theirs"] += t1 - t0
        records["seconds"]["ours"] += time.perf_counter() - t1
    records.update(seed=seed, shared_sr_layers=shared, groups=len(records["ours"][0]["kl_groups"]) if steps else 0,
                   parameters=sum(p.numel() for p in our_net.parameters()))  # fmt: skip
    return records


# ------------------------------------------------------------------------------------------- reporting
def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def first_steps(records: dict, k: int) -> list[dict]:
    """Per step: the largest relative difference of each figure (KL per group included in `kl_groups`)."""
    rows = []
    for t, o in list(zip(records["theirs"], records["ours"], strict=True))[:k]:
        row = {f: rel(t[f], o[f]) for f in FIELDS}
        row["kl_groups"] = max(rel(a, b) for a, b in zip(t["kl_groups"], o["kl_groups"], strict=True))
        rows.append(row)
    return rows


def windows(runs: list[dict], side: str, field: str, window: int) -> list[tuple[float, float]]:
    """(mean over seeds, spread over seeds) of each window's mean of `field`."""
    steps = len(runs[0][side])
    out = []
    for start in range(0, steps - window + 1, window):
        per_seed = [statistics.fmean(r[side][s][field] for s in range(start, start + window)) for r in runs]
        spread = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
        out.append((statistics.fmean(per_seed), spread))
    return out


def paired_table(
    runs: list[dict], window: int, fields=("loss", "recon", "kl", "spectral", "grad_norm")
) -> str:
    """Per window: ours minus the authors' on the same seed (the same batches and noise), mean ± spread over
    seeds. A real difference in the step shows here as a consistent sign, far below the seeds' own spread."""
    steps = len(runs[0]["ours"])
    lines = [
        "| steps | " + " | ".join(f"{f}: ours - authors" for f in fields) + " |",
        "|---|" + "---:|" * len(fields),
    ]
    for start in range(0, steps - window + 1, window):
        cells = []
        for f in fields:
            diffs = [statistics.fmean(r["ours"][s][f] - r["theirs"][s][f] for s in range(start, start + window))
                     for r in runs]  # fmt: skip
            spread = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            cells.append(f"{statistics.fmean(diffs):+.3f} ± {spread:.3f}")
        lines.append(f"| {start + 1}-{start + window} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(runs: list[dict], window: int, fields=("loss", "recon", "kl", "grad_norm")) -> str:
    lines = ["| steps | " + " | ".join(f"{f}: authors | {f}: ours | diff / spread" for f in fields) + " |",
             "|---|" + "---:|---:|---:|" * len(fields)]  # fmt: skip
    per_field = {f: (windows(runs, "theirs", f, window), windows(runs, "ours", f, window)) for f in fields}
    n = len(next(iter(per_field.values()))[0])
    for w in range(n):
        cells = []
        for f in fields:
            (mt, st), (mo, so) = per_field[f][0][w], per_field[f][1][w]
            spread = math.sqrt((st**2 + so**2) / 2)
            ratio = (mo - mt) / spread if spread > 0 else float("nan")
            cells += [f"{mt:.3f} ± {st:.3f}", f"{mo:.3f} ± {so:.3f}", f"{ratio:+.2f}"]
        lines.append(f"| {w * window + 1}-{(w + 1) * window} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(runs: list[dict], first: list[dict], k: int, window: int) -> float:
    """Print the first-steps table and the curves; returns the largest first-steps difference."""
    worst = max(max(row.values()) for row in first) if first else 0.0
    print(
        f"\nfirst {k} steps, seed 0 (shared weights, batches, noise): largest relative difference per figure"
    )
    print("| step | " + " | ".join((*FIELDS, "kl_groups")) + " |")
    print("|---|" + "---:|" * (len(FIELDS) + 1))
    for i, row in enumerate(first):
        print(f"| {i} | " + " | ".join(f"{row[f]:.1e}" for f in (*FIELDS, "kl_groups")) + " |")
    verdict = "holds" if worst <= FIRST_RTOL else "FAILS"
    print(f"first-steps check (<= {FIRST_RTOL:g}): {verdict} (largest {worst:.1e})")
    if len(runs) > 1 and len(runs[0]["ours"]) >= window:
        print(f"\nmean over {len(runs)} seeds ± spread across seeds, per window of {window} steps")
        print(curve_table(runs, window))
        print(f"\nthe same seed's runs paired: ours - authors, mean ± spread over {len(runs)} seeds")
        print(paired_table(runs, window))
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", required=True, help="a checkout of NVlabs/NVAE")
    p.add_argument("--steps", type=int, default=300, help="steps per run (0: only the first steps)")
    p.add_argument("--first", type=int, default=5, help="steps checked to float32 rounding (seed 0)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--window", type=int, default=50)
    p.add_argument("--channels", type=int, default=NETWORK["num_channels_enc"])
    p.add_argument("--groups", type=int, default=NETWORK["num_groups_per_scale"], help="groups per scale")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--own-noise", action="store_true",
                   help="our network draws the posterior noise itself; the authors' side is given the same")  # fmt: skip
    p.add_argument("--json", help="write every run's per-step records here")
    p.add_argument("--report", metavar="JSON", help="print the tables of a run saved with --json, and stop")
    a = p.parse_args(argv)
    if a.report:
        saved = json.loads(Path(a.report).read_text())
        report(saved["runs"], saved["first_steps"], a.first, a.window)
        return 0
    import tempfile

    import torch

    torch.set_num_threads(a.threads)
    from bench.nvlabs_parity import RECIPES

    values = {**RECIPES["mnist"], **NETWORK, "num_channels_enc": a.channels, "num_channels_dec": a.channels,
              "num_groups_per_scale": a.groups}  # fmt: skip
    from bench.nvlabs_parity import _authors, _noise_queue

    images = fashion_mnist()
    checkout = Path(a.official).resolve()
    mods = _authors(checkout)
    queue = _noise_queue(mods)
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        steps = max(a.steps, a.first)
        for seed in range(a.seeds if a.steps else 1):
            runs.append(run_pair(mods, queue, seed, steps, values, Path(tmp), images, a.own_noise))
            r = runs[-1]
            print(f"seed {seed}: {steps} steps, authors {r['seconds']['theirs']:.0f} s, ours "
                  f"{r['seconds']['ours']:.0f} s", flush=True)  # fmt: skip
    first = first_steps(runs[0], a.first)
    worst = report(runs, first, a.first, a.window)
    commit = os.popen(f"git -C {checkout} rev-parse --short HEAD").read().strip()
    if a.json:
        Path(a.json).write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "authors_commit": commit, "values": values,
            "seconds": time.perf_counter() - started, "first_steps": first, "runs": runs}, indent=1))  # fmt: skip
    return 0 if worst <= FIRST_RTOL else 1


if __name__ == "__main__":
    sys.exit(main())
