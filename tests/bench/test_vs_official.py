"""bench/vs_official.py: without an NVlabs/NVAE checkout it says how to get one and exits 2; the ratios and
goals it prints; a smoke run against a checkout (slow, with NVAE_OFFICIAL set)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "vs_official.py"


def _load():
    spec = importlib.util.spec_from_file_location("vs_official", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args, timeout=60):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout
    )


def test_without_a_checkout_it_exits_2_with_one_line_on_how_to_get_one():
    proc = _run("--rounds", "1")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "no NVlabs/NVAE checkout given" in lines[0]
    assert "git clone https://github.com/NVlabs/NVAE" in lines[0] and "--official" in lines[0]
    assert proc.stdout == ""


def test_a_folder_that_is_not_a_checkout_is_named_with_what_it_lacks(tmp_path):
    (tmp_path / "model.py").write_text("")
    proc = _run("--official", str(tmp_path))
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert str(tmp_path) in line and "utils.py" in line and "model.py," not in line


def test_ratios_are_ours_over_the_authors_per_round_and_of_the_medians():
    vs = _load()
    records = [
        {"round": 1, "side": "authors", "train_img_per_s": 5.0, "train_peak_rss_gib": 5.0},
        {"round": 1, "side": "ours", "train_img_per_s": 10.0, "train_peak_rss_gib": 2.5},
        {"round": 2, "side": "authors", "train_img_per_s": 4.0, "train_peak_rss_gib": 5.0},
        {"round": 2, "side": "ours", "train_img_per_s": 6.0, "train_peak_rss_gib": 3.5},
        {"round": 1, "side": "authors", "sample_ms_per_img": 20.0},
        {"round": 1, "side": "ours", "sample_onnx_ms_per_img": 10.0},  # held against their eager sampling
        {"round": 1, "side": "authors", "eval_ms_per_img": 40.0},  # ours failed: no row
    ]
    s = vs.summarize(records)
    assert s["train_img_per_s"]["ratio_per_round"] == [2.0, 1.5]
    assert s["train_img_per_s"]["ratio"] == pytest.approx(8.0 / 4.5)
    assert s["train_img_per_s"]["met"] is False  # goal >= 2x
    assert s["train_peak_rss_gib"]["ratio"] == pytest.approx(0.6)
    assert s["train_peak_rss_gib"]["met"] is True  # goal <= 0.6x
    assert (
        s["sample_onnx_ms_per_img"]["ratio"] == pytest.approx(0.5)
        and "goal" not in s["sample_onnx_ms_per_img"]
    )
    assert "eval_ms_per_img" not in s
    table = vs.table(s)
    assert "| training img/s (fp32) | 4.50 | 8.00 | 1.78x (rounds: 2.00 1.50) | >= 2.0x (not met) |" in table


@pytest.mark.slow
def test_quick_run_against_a_checkout_writes_every_figure(tmp_path):
    official = os.environ.get("NVAE_OFFICIAL")
    if not official:
        pytest.skip("set NVAE_OFFICIAL to an NVlabs/NVAE checkout")
    proc = _run("--official", official, "--quick", "--out", str(tmp_path), timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "vs_official.json").read_text())
    assert set(doc["summary"]) == {
        "train_img_per_s",
        "train_peak_rss_gib",
        "readjust_ms_per_iter",
        "eval_ms_per_img",
        "sample_ms_per_img",
    }
    assert len(set(doc["params"].values())) == 1  # the same model on both sides


def test_a_profile_splits_a_call_into_its_op_groups():
    import torch
    import torch.nn.functional as F

    vs = _load()
    x, w = torch.randn(4, 8, 16, 16), torch.randn(8, 8, 3, 3)
    mean, var = torch.zeros(8), torch.ones(8)

    def call():
        h = F.conv2d(x, w, padding=1)
        h = F.batch_norm(h, mean, var, training=False)
        return F.silu(h) + torch.sigmoid(h) * 2

    split = vs.profile_split(call)
    assert set(split) == {*vs.PROFILE_GROUPS, "rest", "wall"}
    assert all(split[g] > 0 for g in vs.PROFILE_GROUPS)
    assert split["rest"] >= 0 and abs(sum(v for k, v in split.items() if k != "wall") - split["wall"]) < 1e-9


def test_the_profile_bound_is_the_authors_figure_over_our_three_groups():
    vs = _load()
    groups = list(vs.PROFILE_GROUPS)
    ours = {groups[0]: 1.0, groups[1]: 0.3, groups[2]: 0.2, "rest": 0.5, "wall": 2.0}
    theirs = {groups[0]: 1.2, groups[1]: 0.4, groups[2]: 0.6, "rest": 1.0, "wall": 3.2}
    records = [
        {"round": 1, "kind": "train", "side": "authors", "step_s": 3.0, "profile_train": theirs},
        {"round": 1, "kind": "train", "side": "ours", "step_s": 2.0, "profile_train": ours},
        {
            "round": 1,
            "kind": "eval",
            "side": "authors",
            "eval_ms_per_img": 20.0,
            "profile_eval": {k: 10 * v for k, v in theirs.items()},
        },
        {
            "round": 1,
            "kind": "eval",
            "side": "ours",
            "eval_ms_per_img": 17.0,
            "profile_eval": {k: 10 * v for k, v in ours.items()},
        },
    ]
    text = vs.profile_table(records)
    # training: 3.0 s / 1.5 s = 2.00x the authors' img/s at most; evaluation: 15 / 20 ms = 0.75x their time
    assert "training would be 2.00x the authors' img/s" in text
    assert "evaluation would be 0.75x the authors' time" in text
    assert f"| {groups[0]} | 1.200 | 1.000 |" in text
