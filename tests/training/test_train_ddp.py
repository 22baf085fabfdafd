"""`nvae train` under `torchrun --nproc_per_node 2` on CPU (gloo, plain BN): ranks stay in sync on disjoint shards."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from tiny import TINY_SET

REPO = Path(__file__).resolve().parents[2]

# Each torchrun worker runs `nvae train` with two spies: the network the loop builds (to dump its final
# parameters) and the loaders it asks for (to record which samples each rank was given).
WORKER = """
import json, os, sys
import torch
import data.loaders as loaders
import training.train as train_mod

rank, spy_dir = int(os.environ["RANK"]), os.environ["SPY_DIR"]
built, seen = [], []
real_nvae, real_loader = train_mod.NVAE, loaders.make_loader

def nvae(cfg):
    built.append(real_nvae(cfg))
    return built[-1]

def make_loader(*args, **kwargs):
    loader = real_loader(*args, **kwargs)
    plan = loader.plan
    seen.append({"epoch": plan.epoch, "rank": kwargs["rank"], "world_size": kwargs["world_size"],
                 "start": loader.start_batch, "indices": plan.indices.tolist(), "batches": plan.num_batches})
    return loader

train_mod.NVAE, loaders.make_loader = nvae, make_loader
from cli.main import main
code = main(sys.argv[1:])
torch.save({k: v for k, v in built[-1].named_parameters()}, f"{spy_dir}/params-{rank}.pt")
with open(f"{spy_dir}/loaders-{rank}.json", "w") as fh:
    json.dump(seen, fh)
sys.exit(code)
"""


def test_two_gloo_ranks_train_in_sync_on_disjoint_shards(tmp_path, fmnist64):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(worker)]
    cmd += ["train", "--preset", "fmnist-cpu", "--data", str(fmnist64), "--out", str(out), "--no-progress"]
    cmd += ["--batch-size", "8", "--steps", "3", "--eval-every", "3", "--samples", "4", "--device", "cpu"]
    for item in TINY_SET:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "SPY_DIR": str(tmp_path)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    p0 = torch.load(tmp_path / "params-0.pt", weights_only=True)
    p1 = torch.load(tmp_path / "params-1.pt", weights_only=True)
    assert p0.keys() == p1.keys()
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(saved["model"][k], p0[k]) for k in p0)  # rank 0 wrote what both hold
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2
    assert not torch.equal(saved["rng"][0]["cpu"], saved["rng"][1]["cpu"])  # each rank its own noise

    seen = [json.loads((tmp_path / f"loaders-{r}.json").read_text()) for r in (0, 1)]
    assert [s["rank"] for s in seen[0]] == [0] * len(seen[0]) and {s["rank"] for s in seen[1]} == {1}
    assert all(s["world_size"] == 2 for r in seen for s in r)
    trained0 = [s for s in seen[0] if s["epoch"] == 0 and s["start"] == 0][-1]
    trained1 = [s for s in seen[1] if s["epoch"] == 0 and s["start"] == 0][-1]
    assert trained0["batches"] == trained1["batches"] == 4  # 64 images / 2 ranks / batch 8
    assert not set(trained0["indices"]) & set(trained1["indices"])
    assert len(set(trained0["indices"]) | set(trained1["indices"])) == 64

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    # metrics and samples from rank 0 only: one line per step, one grid
    assert len((out / "train_metrics.jsonl").read_text().splitlines()) == 3
    assert [p.name for p in (out / "samples").iterdir()] == ["step-00000003.png"]
