"""What the components run inside their container: the `nvae` command, as a child process.

Kept in the package (not in the component bodies) because KFP serialises each component function on its own;
the bodies stay a few lines of argument plumbing.
"""

from __future__ import annotations

import html
import json
import shlex
import sys
from pathlib import Path


class StepFailed(RuntimeError):
    """A pipeline step's command exited non-zero."""


def split_overrides(overrides: str) -> list[str]:
    """'a=1 b=2' or 'a=1,b=2' -> ['--set', 'a=1', '--set', 'b=2']."""
    items = [s for s in shlex.split(overrides.replace(",", " ")) if s]
    return [arg for item in items for arg in ("--set", item)]


def cli_status(argv: list[str]) -> int:
    """Run `nvae ARGV...` as a child process (`python -m cli`, this interpreter); its exit status (negative:
    killed by that signal). Its output goes to the step's log; SIGTERM and SIGINT reaching the step are passed
    on to it, so a preempted `nvae train` checkpoints before it exits."""
    from training.run import run_forwarding_signals

    print("+ nvae " + " ".join(shlex.quote(a) for a in argv), flush=True)
    sys.stderr.flush()
    code, _ = run_forwarding_signals([sys.executable, "-m", "cli", *argv])
    return code


def run_cli(argv: list[str]) -> None:
    """Run `nvae ARGV...` (cli_status); raise StepFailed on a non-zero exit."""
    code = cli_status(argv)
    if code:
        raise StepFailed(f"nvae {argv[0]} exited with status {code}")


def train_status(argv: list[str], nproc: int) -> int:
    """`nvae train ARGV...` (cli_status), with `--nproc nproc` when nproc > 1: the command then runs itself
    under torchrun, one process per GPU. Its exit status (under torchrun 1 whatever a worker's was)."""
    return cli_status(["train", *argv, *(["--nproc", str(nproc)] if nproc > 1 else [])])


# `nvae train`'s exit statuses that a retry repeats (a flag, config, data or checkpoint problem; cli/train.py).
PERMANENT_EXITS = (1, 2)
PERMANENT_MARKER = "permanent-failure.json"


def run_dir(checkpoint_store: str, run_id: str) -> str:
    """The run's prefix in the store, `s3://bucket/runs/<run id>` ("" when there is no store)."""
    return f"{checkpoint_store.rstrip('/')}/{run_id}" if checkpoint_store else ""


def check_no_permanent_failure(run: str) -> None:
    """Refuse at once when an earlier attempt of this run left the permanent-failure marker: KFP retries a
    failed step whatever its exit status, and a permanent failure would only repeat."""
    from common.s3 import get_json

    marker = get_json(f"{run}/{PERMANENT_MARKER}")
    if marker is not None:
        raise StepFailed(
            f"an earlier attempt of this run failed permanently ({marker.get('what', 'unknown')}; marker "
            f"{run}/{PERMANENT_MARKER}): a retry would fail the same way; fix the cause and start a new run"
        )


def mark_permanent_failure(run: str, what: str) -> None:
    from common.s3 import put_json

    put_json(f"{run}/{PERMANENT_MARKER}", {"what": what})


def run_train(argv: list[str], nproc: int, run: str = "") -> None:
    """`nvae train ARGV...` (train_status), checkpointing under `run`/checkpoints when a run prefix is given,
    so a retried pod resumes from the last checkpoint. One process: a permanent exit (1, 2) leaves the marker
    that fails a retry at once (with torchrun every failure is status 1, so no marker is left)."""
    if run:
        check_no_permanent_failure(run)
        argv = [*argv, "--checkpoint-dir", f"{run}/checkpoints"]
    code = train_status(argv, nproc)
    if code and run and nproc <= 1 and code in PERMANENT_EXITS:
        mark_permanent_failure(run, f"nvae train exited with status {code}")
    if code:
        raise StepFailed(f"nvae train exited with status {code}")


def fetch_checkpoint(run: str, out_dir: str | Path) -> None:
    """Copy the run's last checkpoint (`run`/checkpoints/latest.json names it and its SHA-256) from the store
    to `out_dir`/checkpoint.pt, where the later steps read it."""
    from common.errors import StorageError
    from training.storage import S3CheckpointStore

    store = S3CheckpointStore(f"{run}/checkpoints")
    if store.download_latest(Path(out_dir) / "checkpoint.pt") is None:
        raise StorageError(f"{store.location}latest.json: no checkpoint was written")


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def numeric_items(metrics: dict, keys: list[str]) -> list[tuple[str, float]]:
    """The (key, value) pairs of `metrics` that are present and numeric, for KFP Metrics."""
    return [(k, float(metrics[k])) for k in keys if isinstance(metrics.get(k), int | float)]


def png_html(png_path: str | Path, title: str) -> str:
    """A self-contained HTML page showing a PNG (the KFP UI renders HTML artifacts). Small images (sample
    grids of 28-pixel images, under 256 pixels wide) are enlarged by a whole factor to at least 512 pixels,
    without smoothing; plots keep their size."""
    import base64

    from PIL import Image

    with Image.open(png_path) as img:
        width = img.width
    style = f"width:{width}px;max-width:100%"
    if width < 256:
        style = f"image-rendering:pixelated;width:{width * -(-512 // width)}px"
    data = base64.b64encode(Path(png_path).read_bytes()).decode()
    return (
        f"<html><body><h3>{title}</h3><img style='{style}' src='data:image/png;base64,{data}'/></body></html>"
    )


def write_text(path: str | Path, text: str) -> None:
    """Write an output artifact's file (its folder may not exist yet under kfp.local)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def curves_html(metrics_jsonl: str | Path) -> str:
    """The training curves (loss, -ELBO in bits/dim, KL, learning rate against step) as one HTML page."""
    import tempfile

    from training.metrics import plot_training_curves

    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "curves.png"
        plot_training_curves(metrics_jsonl, png)
        return png_html(png, "Training curves")


def import_instead_of_training(source: str, data_dir: str, model_dir: str, curves_path: str) -> dict:
    """The train step's work when the run starts from an authors' checkpoint: `nvae import-nvlabs` into
    `model_dir`/checkpoint.pt (checked against the prepared dataset), a page saying so where the training
    curves go; returns the import's summary (dataset, parameters, epoch, global step, sha256)."""
    summary_path = Path(model_dir) / "import_summary.json"
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    run_cli(["import-nvlabs", source, "--out", f"{model_dir}/checkpoint.pt", "--data", data_dir,
             "--summary", str(summary_path)])  # fmt: skip
    summary = read_json(summary_path)
    write_text(
        curves_path,
        "<html><body><h3>Not trained in this run</h3><p>Imported from "
        f"{html.escape(source)}: the authors' {html.escape(str(summary['dataset']))} model, "
        f"{summary['parameters']:,} parameters, epoch {summary['epoch']}, step {summary['global_step']} "
        f"(sha256 {summary['sha256'][:16]}...).</p></body></html>",
    )
    return summary
