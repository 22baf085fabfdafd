"""What a training run reports: per-step scalars, per-interval latent statistics, sample grids.

`RunLogger` writes on the main rank only: DVCLive under `RUN/dvclive` (offline: no DVC experiment, no
dvc.yaml, no Studio calls), the same scalars as JSON lines in `RUN/train_metrics.jsonl`, and sample grids
under `RUN/samples/`. Other ranks get a logger whose methods do nothing.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

ACTIVE_KL = 0.1  # a latent channel is active when its mean KL exceeds this (nats)


def latent_stats(kl_diag: torch.Tensor) -> dict[str, float]:
    """KL per group and the count of active latent channels from mean KL per channel `kl_diag` (G, Z)."""
    stats = {f"kl_group/{g:02d}": float(v) for g, v in enumerate(kl_diag.sum(dim=1))}
    stats["active_channels"] = float((kl_diag > ACTIVE_KL).sum())
    stats["active_fraction"] = float((kl_diag > ACTIVE_KL).float().mean())
    return stats


class RunLogger:
    """Per-step and per-interval metrics of one run, written on the main rank (see the module docstring)."""

    def __init__(self, out: Path, enabled: bool, resume: bool, dvclive: bool = True):
        self.out = Path(out)
        self.enabled = enabled
        self.jsonl = self.out / "train_metrics.jsonl"
        self.live = None
        if enabled:  # there from the start, empty until the first step (a run of 0 steps leaves it so)
            self.out.mkdir(parents=True, exist_ok=True)
            self.jsonl.touch()
        if enabled and dvclive:
            self.live = _open_live(self.out / "dvclive", resume)

    def truncate_after(self, step: int) -> int:
        """Drop what was logged after `step` (the checkpoint a resumed run continues from): a run killed after
        its last checkpoint logged steps that the resumed run logs again. Returns the lines dropped from the
        JSONL files; DVCLive's TSV curves are cut the same way."""
        if not self.enabled:
            return 0
        dropped = 0
        files = [self.jsonl, self.out / "eval_metrics.jsonl"]
        for path in files:
            dropped += _keep_lines(path, lambda line: json.loads(line).get("step", 0) <= step)
        for tsv in sorted((self.out / "dvclive" / "plots" / "metrics").rglob("*.tsv")):
            _keep_lines(
                tsv, lambda line: line.split("\t")[0] == "step" or int(float(line.split("\t")[0])) <= step
            )
        return dropped

    def log_step(self, step: int, values: dict[str, Any]) -> None:
        """Scalars of optimisation step `step` (1-based: the number of steps done)."""
        if not self.enabled:
            return
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        if self.live is not None:
            self.live.step = step
            for name, value in values.items():
                self.live.log_metric(f"train/{name}", value, plot=True)
            self.live.next_step()

    def log_interval(self, step: int, values: dict[str, float], grid_path: Path | None) -> None:
        """Latent statistics (and the sample grid) of the evaluation interval ending at `step`."""
        if not self.enabled:
            return
        with (self.out / "eval_metrics.jsonl").open("a") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        if self.live is not None:
            self.live.step = step
            for name, value in values.items():
                self.live.log_metric(f"eval/{name}", value, plot=True)
            if grid_path is not None:
                self.live.log_image(f"samples/{grid_path.name}", grid_path)
            self.live.next_step()

    def close(self) -> None:
        if self.live is not None:
            self.live.end()
            self.live = None


def _keep_lines(path: Path, keep) -> int:
    """Rewrite `path` (atomically) with only the lines `keep` accepts; returns how many it dropped. A line
    `keep` cannot read (a half line a kill left at the end) is dropped too."""
    from common.files import atomic_write_text

    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)

    def kept(line: str) -> bool:
        try:
            return line.endswith("\n") and bool(keep(line.rstrip("\n")))
        except (ValueError, TypeError, AttributeError):
            return False

    new = [line for line in lines if kept(line)]
    if len(new) != len(lines):
        atomic_write_text(path, "".join(new))
    return len(lines) - len(new)


def _open_live(directory: Path, resume: bool):
    """A DVCLive logger that stays offline: no experiment, no dvc.yaml, no Studio."""
    os.environ.setdefault("DVC_STUDIO_OFFLINE", "true")
    try:
        from dvclive import Live
    except ModuleNotFoundError:
        log.warning("dvclive is not installed; metrics go to train_metrics.jsonl only")
        return None
    return Live(dir=str(directory), resume=resume, save_dvc_exp=False, dvcyaml=False, report=None)


CURVES = (
    ("loss", "loss (nats/image)"),
    ("nelbo_bpd", "-ELBO (bits/dim)"),
    ("kl", "KL (nats/image)"),
    ("lr", "learning rate"),
)


def plot_training_curves(metrics_jsonl: str | Path, out_png: str | Path) -> None:
    """Plot loss, -ELBO in bits/dim, KL and learning rate against step from `train_metrics.jsonl`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3), constrained_layout=True)
    for ax, (key, label) in zip(axes, CURVES, strict=True):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
        if points:
            ax.plot(*zip(*points, strict=True), lw=1)
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)


__all__ = ["ACTIVE_KL", "CURVES", "RunLogger", "latent_stats", "plot_training_curves"]
