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


# --- --continue-from: going on with the run that wrote a checkpoint ------------------------------------------------


def test_continue_from_an_authors_checkpoint_goes_on_with_their_run(mnist64, tmp_path, capsys, caplog):
    """Their file holds step 2550 and their optimizer: the run continues at step 2550 with their moments, and
    continuing from the file imported as ours is the very same run."""
    theirs = load_nvlabs_file(AUTHORS)
    their_step = theirs["global_step"]
    runs = {}
    for name, source in (("theirs", AUTHORS), ("imported", tmp_path / "imported.pt")):
        if name == "imported":
            assert main(["import-nvlabs", str(AUTHORS), "--out", str(source)]) == 0
        out = tmp_path / name
        rc, err = _train(capsys, "--data", str(mnist64), "--out", str(out), "--continue-from", str(source),
                         "--steps", str(their_step + 2), "--precision", "fp32")  # fmt: skip
        assert rc == 0, err
        assert "batches_per_epoch was 150 and is now 4" in caplog.text  # their loader: 150 per process
        saved = read_checkpoint(out / "checkpoint.pt")
        assert saved["step"] == their_step + 2
        assert {float(s["step"]) for s in saved["optimizer"]["state"].values()} == {2.0 + 2}
        logged = [json.loads(line)["step"] for line in (out / "train_metrics.jsonl").read_text().splitlines()]
        assert logged == [their_step + 1, their_step + 2]
        runs[name] = saved["model"]
    assert all(torch.equal(runs["imported"][k], v) for k, v in runs["theirs"].items())

    # Running the same command again resumes the run's own checkpoint, which wins over --continue-from.
    rc, err = _train(capsys, "--data", str(mnist64), "--out", str(tmp_path / "theirs"), "--continue-from",
                     str(AUTHORS), "--steps", str(their_step + 3), "--precision", "fp32")  # fmt: skip
    assert rc == 0, err
    assert read_checkpoint(tmp_path / "theirs" / "checkpoint.pt")["step"] == their_step + 3
    lines = (tmp_path / "theirs" / "train_metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [their_step + k for k in (1, 2, 3)]


def test_continue_from_weights_only_is_one_line(mnist64, tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    assert main(["import-nvlabs", str(AUTHORS), "--out", str(weights), "--weights-only"]) == 0
    out = tmp_path / "run"
    rc, err = _train(capsys, "--data", str(mnist64), "--out", str(out), "--continue-from", str(weights))
    line = err.strip().splitlines()[-1]
    assert rc == 2 and "holds weights only" in line and "--init-from starts a new run" in line
    assert not (out / "checkpoint.pt").exists()


def test_init_from_and_continue_from_exclude_each_other(mnist64, tmp_path, capsys):
    rc, err = _train(capsys, "--data", str(mnist64), "--out", str(tmp_path / "r"), "--init-from", str(AUTHORS),
                     "--continue-from", str(AUTHORS))  # fmt: skip
    assert rc == 2 and "not allowed with argument" in err
