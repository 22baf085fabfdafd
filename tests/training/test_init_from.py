"""`nvae train --init-from`: a run that starts from a checkpoint (ours, or an authors'), and `--steps 0`, which
trains nothing and passes the starting model on with the run's files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli.main import main
from model.checkpoint import read_checkpoint
from model.nvlabs import import_nvlabs, load_nvlabs_file

AUTHORS = Path(__file__).resolve().parents[1] / "model" / "nvlabs" / "tiny-mnist.pt"


@pytest.fixture(scope="module")
def mnist64(tmp_path_factory):
    """64 images per split of the embedded Fashion-MNIST files, prepared as the mnist recipe."""
    from data.prepare import prepare

    source = Path("/usr/share/datasets/fashion-mnist")
    if not source.exists():
        pytest.skip(f"{source} is not available (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("prepared") / "mnist64"
    prepare("mnist", source, out, limit=64)
    return out


def _train(capsys, *argv: str) -> tuple[int, str]:
    try:
        rc = main(["train", "--no-progress", "--batch-size", "16", *argv])
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err


def test_steps_0_from_an_authors_checkpoint_passes_its_weights_on(mnist64, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = _train(
        capsys, "--data", str(mnist64), "--out", str(out), "--init-from", str(AUTHORS), "--steps", "0"
    )
    assert rc == 0, err
    saved = read_checkpoint(out / "checkpoint.pt")
    imported = import_nvlabs(load_nvlabs_file(AUTHORS))
    for key, tensor in imported.state.items():
        if not key.startswith("spectral."):  # the power-iteration vectors start afresh on each side
            assert torch.equal(saved["model"][key], tensor), key
    assert saved["step"] == 0 and json.loads(saved["config"])["dmol_edge"] == "released"
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 0
    assert (out / "train_metrics.jsonl").read_text() == ""
    (stats,) = [json.loads(line) for line in (out / "eval_metrics.jsonl").read_text().splitlines()]
    assert stats["step"] == 0 and stats["active_channels"] >= 0
    assert (out / "samples" / "step-00000000.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "dvclive" / "metrics.json").read_text())["eval"]

    # Running again with steps resumes from that checkpoint and trains on from the authors' weights.
    rc, err = _train(
        capsys, "--data", str(mnist64), "--out", str(out), "--init-from", str(AUTHORS), "--steps", "2"
    )
    assert rc == 0, err
    assert read_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert len((out / "train_metrics.jsonl").read_text().splitlines()) == 2

    # One of our own checkpoints is a starting point too: a new run starts from its weights, spectral state
    # included.
    ours = tmp_path / "from-ours"
    argv = [
        "--data",
        str(mnist64),
        "--out",
        str(ours),
        "--init-from",
        str(out / "checkpoint.pt"),
        "--steps",
        "0",
    ]
    rc, err = _train(capsys, *argv)
    assert rc == 0, err
    before, after = (
        read_checkpoint(out / "checkpoint.pt")["model"],
        read_checkpoint(ours / "checkpoint.pt")["model"],
    )
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_steps_0_without_a_starting_checkpoint_is_one_line(fmnist64, tmp_path, capsys):
    rc, err = _train(capsys, "--data", str(fmnist64), "--out", str(tmp_path / "r"), "--steps", "0")
    assert rc == 2 and "--steps 0 trains nothing: it needs --init-from" in err.strip().splitlines()[-1]


def test_an_override_that_changes_the_shapes_is_named(mnist64, tmp_path, capsys):
    argv = ["--data", str(mnist64), "--out", str(tmp_path / "r"), "--init-from", str(AUTHORS), "--steps", "0"]
    rc, err = _train(capsys, *argv, "--set", "z_channels=5")
    assert rc == 2
    line = err.strip().splitlines()[-1]
    assert "--init-from:" in line and "in this config" in line


def test_the_data_must_be_the_starting_models_dataset(fmnist64, tmp_path, capsys):
    argv = [
        "--data",
        str(fmnist64),
        "--out",
        str(tmp_path / "r"),
        "--init-from",
        str(AUTHORS),
        "--steps",
        "0",
    ]
    rc, err = _train(capsys, *argv)
    assert rc == 2 and f"--init-from {AUTHORS} is for 'mnist'" in err.strip().splitlines()[-1]
