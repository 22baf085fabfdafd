"""Equal CPU budget, the authors' train() against our training step: which reaches the better test NLL?

Each run trains one side alone for --budget seconds from its own freshly built network (the seed's), on the
same data law as bench/train_parity.py (Fashion-MNIST training images in a seeded order, one Bernoulli draw per
pixel; the authors' side padded to 32x32), with its own posterior noise. The run's length in steps is set from
that side's measured time per step (a calibration of --calibrate steps on a throw-away copy first), so that the
KL warm-up spans 30 % of each run's own steps, as a user of either code would set it; the budget is also a hard
stop, so no side trains longer than --budget seconds. Then both are evaluated by
the same estimator (`inference.evaluate.evaluate`, the authors' network imported by `model.nvlabs`): the IW
bound with K=--k on the first --images test images, binarized once with a fixed seed, the same on both sides.

    python bench/train_budget.py --official /tmp/nvae-official --budget 660 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_parity import NETWORK, Ours, Theirs, batches, fashion_mnist, imported_weights  # noqa: E402

TEST_BINARIZE_SEED = 20200708


def _test_images(n: int):
    import torch

    from bench.train_parity import FASHION_MNIST
    from data.sources import read_idx_source

    source = read_idx_source(FASHION_MNIST, None)
    images = next(iter(source.splits["test"])).load()[:n]
    x = torch.from_numpy(images.copy()).float().div_(255).reshape(-1, 1, 28, 28)
    return (torch.rand(x.shape, generator=torch.Generator().manual_seed(TEST_BINARIZE_SEED)) < x).float()


def _build(mods, values: dict, seed: int, workdir: Path):
    """Their network under `seed` and ours with the same weights (both fresh)."""
    import torch

    from bench.nvlabs_parity import _COMMON
    from model.network import NVAE

    args = argparse.Namespace(**{**_COMMON, **values})
    torch.manual_seed(seed)
    theirs = mods["model"].AutoEncoder(args, None, mods["utils"].get_arch_cells(args.arch_instance))
    imported = imported_weights(mods, theirs, args, workdir)
    torch.manual_seed(seed + 1)
    ours = NVAE(imported.config).to(memory_format=torch.channels_last)
    ours.load_state_dict(imported.state, strict=False)
    return theirs, args, ours


def _as_ours(mods, their_net, args, workdir: Path):
    """The authors' trained network as ours, for the shared evaluator."""
    from model.network import NVAE

    imported = imported_weights(mods, their_net, args, workdir)
    net = NVAE(imported.config)
    net.load_state_dict(imported.state, strict=False)
    return net


def _side(side: str, mods, queue, values, seed, steps, images, per_epoch, workdir):
    """A trainer for `side` ("theirs" or "ours") of `steps` steps from the seed's fresh network, drawing its
    own noise: (one step on a batch -> its loss, the trained network as ours)."""
    import torch.nn.functional as F

    their_net, args, our_net = _build(mods, values, seed, workdir)
    if side == "theirs":
        trainer = Theirs(mods, their_net, args, steps, int(args.warmup_epochs * per_epoch))
        pad = (our_net.cfg.pad,) * 4
        return (lambda x: trainer.step(F.pad(x, pad), queue)["loss"]), lambda: _as_ours(
            mods, their_net, args, workdir
        )
    trainer = Ours(our_net, steps, per_epoch)
    return (lambda x: trainer.step(x)["loss"]), lambda: our_net


def run(mods, queue, side: str, seed: int, budget: float, calibrate: int, values, images, test, k, workdir,
        fixed_steps: int | None = None):  # fmt: skip
    import torch

    from inference.evaluate import evaluate

    per_epoch = 60_000 // values["batch_size"]
    if fixed_steps:  # a set length, no time limit
        steps, budget = fixed_steps, float("inf")
    else:  # calibration: time per step of this side, on a throw-away copy (its first steps include warm-up)
        advance, _ = _side(side, mods, queue, values, seed, 10_000, images, per_epoch, workdir)
        stream = batches(images, values["batch_size"], calibrate + 2, seed + 3)
        for x in (next(stream), next(stream)):
            advance(x)
        t0 = time.perf_counter()
        for x in stream:
            advance(x)
        per_step = (time.perf_counter() - t0) / calibrate
        steps = max(1, int(budget / per_step))
    torch.manual_seed(seed + 2)  # the posterior noise of the real run
    advance, trained = _side(side, mods, queue, values, seed, steps, images, per_epoch, workdir)
    # The calibrated length sets the KL warm-up; the budget itself is a hard stop, so that a side whose steps
    # slow down later never trains longer than the other.
    losses, t0 = [], time.perf_counter()
    for x in batches(images, values["batch_size"], steps, seed + 3):
        losses.append(advance(x))
        if time.perf_counter() - t0 >= budget:
            break
    seconds = time.perf_counter() - t0
    net = trained().eval()
    with torch.no_grad():
        metrics = evaluate(
            net, [test[i : i + 50] for i in range(0, test.size(0), 50)], k, seed=0, progress=False
        )
    return {"side": side, "seed": seed, "steps": len(losses), "planned_steps": steps, "seconds": seconds,
            "img_per_s": len(losses) * values["batch_size"] / seconds,
            "train_loss_last50": statistics.fmean(losses[-50:]), "test_nll_nats": metrics["nll_nats"],
            "loss_per_50": [statistics.fmean(losses[i : i + 50]) for i in range(0, len(losses), 50)],
            "test_nll_stderr": metrics["nll_nats_stderr"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", required=True)
    p.add_argument("--budget", type=float, default=660.0, help="training seconds per run")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sides", nargs="+", choices=("theirs", "ours"), default=["theirs", "ours"],
                   help="run only these sides (e.g. to repeat one run that was disturbed)")  # fmt: skip
    p.add_argument("--seed-list", type=int, nargs="+", help="these seeds instead of 0..--seeds-1")
    p.add_argument(
        "--steps", type=int, help="train this many steps on each side instead of for --budget seconds"
    )
    p.add_argument("--calibrate", type=int, default=20)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--groups", type=int, default=NETWORK["num_groups_per_scale"])
    p.add_argument("--json")
    a = p.parse_args(argv)

    from bench.nvlabs_parity import RECIPES, _authors, _noise_queue

    values = {**RECIPES["mnist"], **NETWORK, "num_groups_per_scale": a.groups}
    mods = _authors(Path(a.official).resolve())
    queue = _noise_queue(mods)
    images, test = fashion_mnist(), _test_images(a.images)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seed_list or range(a.seeds):
            for side in a.sides:
                setting = (a.budget, a.calibrate, values, images, test, a.k, Path(tmp), a.steps)
                rows.append(run(mods, queue, side, seed, *setting))
                print(json.dumps(rows[-1]), flush=True)
    print(
        f"\n| code | steps | img/s | train loss, mean of the last 50 steps | test IW NLL (K={a.k}, {a.images} images) |"
    )
    print("|---|---:|---:|---:|---:|")
    for side, name in (("theirs", "authors"), ("ours", "ours")):
        got = [r for r in rows if r["side"] == side]
        if not got:
            continue

        def cell(key, fmt, got=got):
            values_ = [r[key] for r in got]
            spread = statistics.stdev(values_) if len(values_) > 1 else 0.0
            return f"{statistics.fmean(values_):{fmt}} ± {spread:{fmt}}"

        print(f"| {name} | {cell('steps', '.0f')} | {cell('img_per_s', '.1f')} | {cell('train_loss_last50', '.2f')} | "
              f"{cell('test_nll_nats', '.2f')} nats |")  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
