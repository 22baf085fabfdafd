"""An output that cannot be written is found before the work: the commands that end by writing a file check its
folder first (`common.files.check_writable`), and the line names the path the user gave, never a temporary
file. A full disk found only at the end is still one line naming that path."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from cli.main import main
from model.checkpoint import save_checkpoint
from model.network import NVAE

UNWRITABLE = Path("/sys/nvae-out")  # sysfs refuses new files, even to root
AUTHORS = Path(__file__).resolve().parents[1] / "model" / "nvlabs" / "tiny-mnist.pt"


@pytest.fixture
def checkpoint(tmp_path, make_tiny):
    torch.manual_seed(0)
    path = tmp_path / "c.pt"
    save_checkpoint(path, NVAE(make_tiny()))
    return path


def _work_never_starts(monkeypatch, target: str) -> None:
    def started(*a, **k):
        raise AssertionError(f"{target} ran: the output was not checked first")

    monkeypatch.setattr(target, started)


@pytest.mark.parametrize(
    ("argv", "out", "work"),
    [
        (["export-onnx", "--checkpoint", "{ckpt}", "--out"], "decoder.onnx", "model.checkpoint.load_model"),
        (["readjust-bn", "--checkpoint", "{ckpt}", "--temperature", "0.8", "--out"], "bn.pt",
         "inference.readjust.load_for_inference"),
        (["evaluate", "--checkpoint", "{ckpt}", "--data", "{tmp}", "--out"], "metrics.json",
         "inference.evaluate.load_for_inference"),
        (["sample", "--checkpoint", "{ckpt}", "--out"], "grids", "inference.sample._load_sampling_model"),
        (["import-nvlabs", str(AUTHORS), "--out"], "ours.pt", "inference.nvlabs.load_nvlabs_file"),
        (["export-nvlabs", "--checkpoint", "{ckpt}", "--out"], "theirs.pt", "model.checkpoint.read_checkpoint"),
    ],
)  # fmt: skip
def test_an_unwritable_output_is_one_line_before_any_work(
    monkeypatch, capsys, tmp_path, checkpoint, argv, out, work
):
    if not Path("/sys").is_dir():
        pytest.skip("no /sys on this machine")
    _work_never_starts(monkeypatch, work)
    target = UNWRITABLE / out
    args = [a.format(ckpt=checkpoint, tmp=tmp_path) for a in argv] + [str(target)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    shown = target / "samples.npz" if argv[0] == "sample" else target
    assert f"{shown}: " in err and ".tmp" not in err and ".probe" not in err, err


@pytest.fixture
def full_folder(tmp_path):
    """A 256 KiB tmpfs, filled to the last block (needs root and mount rights; skipped elsewhere)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode:  # fmt: skip
        pytest.skip("cannot mount a tmpfs here")
    try:
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:  # ENOSPC: full
            pass
        finally:
            os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(capsys, checkpoint, full_folder):
    target = full_folder / "bn.pt"
    assert main(["readjust-bn", "--checkpoint", str(checkpoint), "--temperature", "0.8", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{target}: no space left on device"), err
    assert sorted(p.name for p in full_folder.iterdir()) == ["filler"]


def test_a_disk_that_fills_during_the_work_is_still_one_line_naming_the_output(
    monkeypatch, capsys, checkpoint, full_folder
):
    monkeypatch.setattr("inference.readjust.check_writable", lambda path: None)  # the folder passed its check
    target = full_folder / "bn.pt"
    assert main(["readjust-bn", "--checkpoint", str(checkpoint), "--temperature", "0.8", "--out", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{target}: no space left on device") and "\n" not in err, err
    assert sorted(p.name for p in full_folder.iterdir()) == ["filler"]  # no temporary file left
