"""One writer per run folder, and a resumed run that logs no step twice."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from cli.main import main
from common.errors import NVAEError
from common.files import LOCK_NAME, FolderLock
from training.train import TrainOptions, train


class Killed(Exception):
    pass


def _source(cfg, kill_at=None, per_epoch=3):
    def batches(epoch, start):
        for i in range(start, per_epoch):
            if kill_at is not None and epoch * per_epoch + i == kill_at:
                raise Killed  # the process dies here: nothing after the last checkpoint is saved
            g = torch.Generator().manual_seed(1000 * epoch + i)
            yield torch.randint(0, 256, (4, 1, cfg.data_size, cfg.data_size), generator=g).float() / 255

    return batches


def _opts(out, steps=6):
    return TrainOptions(steps=steps, batches_per_epoch=3, out=out, checkpoint_every=2, progress=False, log_every=1,
                        eval_every=3)  # fmt: skip


def _steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_a_resumed_run_logs_every_step_once(tmp_path, tiny_cfg):
    with pytest.raises(Killed):
        train(tiny_cfg, _source(tiny_cfg, kill_at=5), _opts(tmp_path))
    assert _steps(tmp_path / "train_metrics.jsonl") == [
        1,
        2,
        3,
        4,
        5,
    ]  # step 5 came after the checkpoint at 4
    with open(tmp_path / "train_metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "lo')  # and a half line, as a kill mid-write leaves
    train(tiny_cfg, _source(tiny_cfg), _opts(tmp_path))
    assert _steps(tmp_path / "train_metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    assert _steps(tmp_path / "eval_metrics.jsonl") == [3, 6]
    for tsv in (tmp_path / "dvclive" / "plots" / "metrics").rglob("*.tsv"):
        rows = [line.split("\t")[0] for line in tsv.read_text().splitlines()[1:]]
        assert len(rows) == len(set(rows)), tsv


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, tiny_cfg):
    with FolderLock(tmp_path, "a test"):
        with pytest.raises(NVAEError, match=r"in use by PID \d+ \(a test\)"):
            train(tiny_cfg, _source(tiny_cfg), _opts(tmp_path))
        assert not (tmp_path / "checkpoint.pt").exists()
    train(tiny_cfg, _source(tiny_cfg), _opts(tmp_path, steps=1))  # free again once the holder is done


def test_the_lock_of_a_killed_process_is_gone_with_it(tmp_path, tiny_cfg):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from common.files import FolderLock\n"
         f"with FolderLock({str(tmp_path)!r}, 'nvae train'):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(NVAEError, match=f"in use by PID {holder.pid} "):
            train(tiny_cfg, _source(tiny_cfg), _opts(tmp_path, steps=1))
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    assert (tmp_path / LOCK_NAME).exists()  # the file stays; its lock went with the process
    train(tiny_cfg, _source(tiny_cfg), _opts(tmp_path, steps=1))


def test_nvae_train_into_a_busy_folder_is_one_line_exit_2(tmp_path, fmnist64, capsys):
    out = tmp_path / "run"
    with FolderLock(out, "nvae train"):
        try:
            rc = main(["train", "--data", str(fmnist64), "--out", str(out), "--steps", "1", "--no-progress",
                       "--set", "channels=8", "--set", "groups=2", "--batch-size", "8"])  # fmt: skip
        except SystemExit as exc:
            rc = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "is in use by PID" in err[-1] and "Traceback" not in "\n".join(err)
