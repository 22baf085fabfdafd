"""What the components run inside their container: the `nvae` CLI, in-process or under torchrun.

Kept in the package (not in the component bodies) because KFP serialises each component function on its own;
the bodies stay a few lines of argument plumbing.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path


class StepFailed(RuntimeError):
    """A pipeline step's command exited non-zero."""


def split_overrides(overrides: str) -> list[str]:
    """'a=1 b=2' or 'a=1,b=2' -> ['--set', 'a=1', '--set', 'b=2']."""
    items = [s for s in shlex.split(overrides.replace(",", " ")) if s]
    return [arg for item in items for arg in ("--set", item)]


def run_cli(argv: list[str]) -> None:
    """Run `nvae ARGV...` in this process; raise StepFailed on a non-zero exit."""
    from cli.main import main

    print("+ nvae " + " ".join(shlex.quote(a) for a in argv), flush=True)
    code = main(argv)
    if code:
        raise StepFailed(f"nvae {argv[0]} exited with status {code}")


def run_train(argv: list[str], nproc: int) -> None:
    """`nvae train ARGV...`, under `torchrun --nproc_per_node nproc` when nproc > 1 (one process per GPU)."""
    if nproc <= 1:
        run_cli(["train", *argv])
        return
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "cli",
        "train",
        *argv,
    ]
    print("+ " + " ".join(shlex.quote(a) for a in cmd), flush=True)
    code = subprocess.call(cmd)
    if code:
        raise StepFailed(f"torchrun nvae train exited with status {code}")


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
