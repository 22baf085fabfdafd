"""The authors' evaluate.py and `nvae evaluate` on the same model and the same test images: the
importance-weighted NLL of each, which must agree within their Monte-Carlo error.

The model is trained here (`nvae train`, the MNIST recipe at a CPU size, on the embedded Fashion-MNIST files
read as the mnist recipe) and written in the authors' format with `nvae export-nvlabs`, so this also shows
their evaluate.py running on a model of ours. Both sides evaluate the whole test split (10,000 images, as
their test() does; they shuffle it, which does not change a mean over all of it) with K importance samples
and dynamic binarization (their loader's protocol; `nvae evaluate --binarization dynamic`). The two figures
are independent estimates of one expectation (over the binarization draws and the importance samples): they
should differ by less than 3 standard errors of the difference, from our per-image spread.

Their evaluate.py runs unmodified in its own process, through this script's CPU shims (tensors' and modules'
.cuda() are the identity; the one-process process group is gloo; their SyncBatchNormSwish takes the branch
a one-process run takes, as bench/vs_official.py does; their SyncBatchNorm stays on, as in their training:
their evaluate.py loads a checkpoint non-strictly, so with it off the `.bn.` names of the file would not load
and the BN layers would silently keep their initial statistics; their averaging helpers are the identity in one
process, and their parameter count (in millions) is summed with Python's sum, not numpy's deprecated one;
torch.load admits the argparse.Namespace their checkpoints pickle; tensorboardX, scipy and lmdb,
which their modules import for training logs, other datasets and FID only, are stand-ins that raise when
called if they are not installed). Nothing of their code is copied.

A second run with the same settings in the same --out reuses the trained model and our evaluation.

    python bench/nvlabs_eval.py --official /tmp/nvae-official --k 10
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAW = Path("/usr/share/datasets/fashion-mnist")
IDX = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# The MNIST recipe at a size a 2-core CPU trains in minutes: two scales, ada_groups, one flow pair.
TRAIN_SET = ["channels=16", "z_channels=8", "groups=4", "cells_enc=1", "cells_dec=1", "pre_blocks=1",
             "pre_cells=2", "post_blocks=1", "post_cells=2", "num_nf=1", "warmup_epochs=0.2"]  # fmt: skip

# Run as `python -c LAUNCHER NVAE_DIR evaluate.py-args...`: their evaluate.py under the CPU shims.
LAUNCHER = r"""
import argparse, os, runpy, sys
import torch, torch.nn as nn, torch.distributed as dist, torch.nn.functional as F
nvae_dir = sys.argv[1]
sys.path.insert(0, nvae_dir)
os.chdir(nvae_dir)
torch.Tensor.cuda = lambda self, *a, **k: self
nn.Module.cuda = lambda self, *a, **k: self
torch.cuda.set_device = lambda *a, **k: None
torch.cuda.synchronize = lambda *a, **k: None
_init = dist.init_process_group
dist.init_process_group = lambda backend=None, *a, **k: _init("gloo", *a, **k)
torch.serialization.add_safe_globals([argparse.Namespace])
import importlib, types
def unused(*a, **k):
    raise RuntimeError("not installed here: MNIST evaluation does not use it")
# Imported by their modules for training logs, other datasets and FID only: stand-ins when not installed.
for name, attrs in (("tensorboardX", ["SummaryWriter"]), ("scipy", []), ("scipy.io", ["loadmat"]),
                    ("scipy.linalg", ["sqrtm"]), ("lmdb", ["open"])):
    try:
        importlib.import_module(name)
    except ImportError:
        stub = sys.modules[name] = types.ModuleType(name)
        for attr in attrs:
            setattr(stub, attr, unused)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, stub)
import thirdparty.inplaced_sync_batchnorm as isbn
def one_process(self, x):
    self._check_input_dim(x)
    momentum = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats:
        self.num_batches_tracked = self.num_batches_tracked + 1
    out = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                       self.training or not self.track_running_stats, momentum, self.eps)
    return isbn.swish.apply(out)
isbn.SyncBatchNormSwish.forward = one_process
import utils
utils.average_gradients = lambda params, is_distributed: None
utils.average_params = lambda params, is_distributed: None
utils.average_tensor = lambda t, is_distributed: None
# the same count: np.sum over a generator, which today's numpy refuses
utils.count_parameters_in_M = lambda m: sum(p.numel() for n, p in m.named_parameters() if "auxiliary" not in n) / 1e6
torch.set_flush_denormal(True)
sys.argv = ["evaluate.py"] + sys.argv[2:]
runpy.run_path(os.path.join(nvae_dir, "evaluate.py"), run_name="__main__")
"""


def _done(path: Path, **expected) -> dict | None:
    """The JSON at `path` when an earlier run of this script left it with the `expected` values, else None."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if all(found.get(k) == v for k, v in expected.items()) else None


def _nvae(*argv: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "cli", *argv], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"nvae {argv[0]} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="an NVlabs/NVAE checkout")
    parser.add_argument("--k", type=int, default=20, help="importance samples per image, both sides")
    parser.add_argument("--steps", type=int, default=600, help="training steps of the model evaluated")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "nvlabs_eval")
    args = parser.parse_args(argv)
    if not (args.official / "evaluate.py").is_file():
        print(f"nvlabs_eval: error: {args.official} is not an NVlabs/NVAE checkout", file=sys.stderr)
        return 2
    work = args.out
    work.mkdir(parents=True, exist_ok=True)
    threads = str(os.cpu_count() or 1)

    prepared = work / "data"
    if not (prepared / "manifest.json").is_file():
        _nvae("prepare", "--dataset", "mnist", "--source", str(RAW), "--out", str(prepared))
    raw = work / "raw" / "MNIST" / "raw"  # what torchvision's MNIST reads, unpacked
    raw.mkdir(parents=True, exist_ok=True)
    for name in IDX:
        if not (raw / name).is_file():
            with gzip.open(RAW / f"{name}.gz") as src, open(raw / name, "wb") as dst:
                shutil.copyfileobj(src, dst)

    run = work / "train"
    t0 = time.perf_counter()
    sets = [x for s in TRAIN_SET for x in ("--set", s)]
    if _done(run / "train_summary.json", steps=args.steps) is None:  # an earlier run's model, if the same
        _nvae("train", "--preset", "mnist", "--data", str(prepared), "--out", str(run), "--steps", str(args.steps),
              "--batch-size", "32", "--precision", "fp32", "--no-progress", "--eval-every", str(args.steps), *sets)  # fmt: skip
    train_s = time.perf_counter() - t0
    ours = run / "checkpoint.pt"
    theirs = work / "checkpoint-nvlabs.pt"
    _nvae("export-nvlabs", "--checkpoint", str(ours), "--out", str(theirs))

    t0 = time.perf_counter()
    metrics = work / "ours.json"
    if _done(metrics, iw_samples=args.k, checkpoint_mtime=ours.stat().st_mtime) is None:
        _nvae("evaluate", "--checkpoint", str(ours), "--data", str(prepared), "--split", "test", "--iw-samples",
              str(args.k), "--binarization", "dynamic", "--batch-size", "100", "--out", str(metrics))  # fmt: skip
        record = json.loads(metrics.read_text())
        record.update(checkpoint_mtime=ours.stat().st_mtime, seconds=round(time.perf_counter() - t0, 1))
        metrics.write_text(json.dumps(record))
    ours_s = json.loads(metrics.read_text()).get("seconds")
    mine = json.loads(metrics.read_text())

    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER, str(args.official.resolve()), "--checkpoint", str(theirs.resolve()),
         "--data", str((work / "raw").resolve()), "--eval_mode", "evaluate", "--num_iw_samples", str(args.k),
         "--batch_size", "100", "--save", str((work / "authors").resolve())],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    theirs_s = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    found = re.search(r"final valid neg log p ([-0-9.eE+]+)\s", text)
    if proc.returncode or not found:
        print(f"the authors' evaluate.py failed:\n{text[-4000:]}", file=sys.stderr)
        return 1
    nll_theirs = float(found[1])
    diff = mine["nll_nats"] - nll_theirs
    se = mine["nll_nats_stderr"] * math.sqrt(2)  # two independent estimates of one expectation
    result = {
        "date": datetime.date.today().isoformat(),
        "commit": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),  # fmt: skip
        "k": args.k,
        "images": mine["num_images"],
        "train_steps": args.steps,
        "train_s": round(train_s, 1),
        "nll_nats_ours": mine["nll_nats"],
        "nll_nats_authors": nll_theirs,
        "difference_nats": diff,
        "stderr_of_difference_nats": se,
        "difference_in_stderr": diff / se,
        "nll_bpd_ours": mine["nll_bpd"],
        "nll_bpd_authors": nll_theirs / (math.log(2) * mine["dims"]),
        "seconds_ours": ours_s,
        "seconds_authors": round(theirs_s, 1),
        "passed": abs(diff) <= 3 * se,
    }
    (work / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
