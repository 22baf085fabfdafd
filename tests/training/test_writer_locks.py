"""Every command that writes into a training run holds that run's lock: a second writer is refused with one
line naming the holder, before any work; outputs outside any run take no lock and leave no lock file."""

from __future__ import annotations

import json

import pytest

from cli.main import main
from common.files import LOCK_NAME, FolderLock, enclosing_run


@pytest.fixture
def held_run(tmp_path):
    run = tmp_path / "run"
    with FolderLock(run, "nvae train"):  # as a live `nvae train --out run` holds it
        yield run


@pytest.mark.parametrize(
    "argv",
    [
        ["evaluate", "--checkpoint", "missing.pt", "--data", "nowhere", "--out", "{run}/metrics.json"],
        ["evaluate", "--checkpoint", "missing.pt", "--data", "nowhere", "--out", "elsewhere.json",
         "--kl-plot", "{run}/kl.png"],
        ["readjust-bn", "--checkpoint", "missing.pt", "--temperature", "0.7", "--out", "{run}/checkpoint_bn.pt"],
        ["sample", "--checkpoint", "missing.pt", "--out", "{run}/samples"],
        ["export-onnx", "--checkpoint", "missing.pt", "--out", "{run}/deep/er/decoder.onnx"],
        ["import-nvlabs", "missing.pt", "--out", "{run}/checkpoint.pt"],
        ["plot-kl", "--metrics", "missing.json", "--out", "{run}/kl.png"],
    ],
    ids=["evaluate", "kl-plot", "readjust-bn", "sample", "export-onnx", "import-nvlabs", "plot-kl"],
)  # fmt: skip
def test_a_second_writer_into_a_live_run_is_refused_naming_the_holder(held_run, argv, capsys, monkeypatch):
    monkeypatch.chdir(held_run.parent)
    argv = [a.replace("{run}", str(held_run)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{held_run} is in use by PID" in err and "(nvae train)" in err, err  # before the missing input
    assert sorted(p.name for p in held_run.iterdir()) == [LOCK_NAME]  # nothing written


def test_a_writer_into_a_finished_run_takes_its_lock_and_a_plain_folder_gets_none(tmp_path, monkeypatch):
    run = tmp_path / "run"
    with FolderLock(run, "nvae train"):
        pass  # the run ended: its lock file stays, unheld
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"kl_per_group": [1.0, 0.5], "num_images": 2, "iw_samples": 1,
                                   "nll_bpd": 1.0, "nelbo_bpd": 1.1}))  # fmt: skip
    assert main(["plot-kl", "--metrics", str(metrics), "--out", str(run / "kl.png")]) == 0
    assert "(nvae plot-kl)" in (run / LOCK_NAME).read_text()  # it was the writer while it ran
    plain = tmp_path / "plain"
    assert main(["plot-kl", "--metrics", str(metrics), "--out", str(plain / "kl.png")]) == 0
    assert sorted(p.name for p in plain.iterdir()) == ["kl.png"]


def test_the_enclosing_run_is_the_nearest_folder_with_a_lock_file(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / LOCK_NAME).write_text("")
    assert enclosing_run(tmp_path / "a" / "b" / "c" / "file.png") == tmp_path / "a"
    assert enclosing_run(tmp_path / "a") == tmp_path / "a"
    assert enclosing_run(tmp_path / "other.png") is None
