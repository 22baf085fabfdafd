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
