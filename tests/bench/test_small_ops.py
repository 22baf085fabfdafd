"""bench/small_ops.py: the batched weight norm gives the per-layer gradients, and the script prints every row."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "small_ops.py"


def test_small_ops_runs_and_its_batched_weight_norm_has_the_per_layer_gradients():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "fmnist-cpu", "--repeats", "1", "--no-compile"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    diff = float(re.search(r"grad max diff ([0-9.e+-]+)", out).group(1))
    assert diff <= 1e-6
    for row in (
        "weight norm",
        "spectral term",
        "gradient norm",
        "AdaMax, foreach=True",
        "AdaMax, one flat tensor",
    ):
        assert row in out, row
    assert "compiled" not in out.split("(per layer")[0]  # --no-compile: no compiled rows
