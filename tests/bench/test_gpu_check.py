"""bench/gpu_check.py without a GPU: the authors' published per-GPU throughput it records beside ours."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_authors_published_throughput_from_table_6():
    gc = _load()
    # MNIST: 400 epochs x 60k images in 21 h on 2 V100s; CIFAR-10: 400 x 50k in 55 h on 8
    assert gc.authors_img_per_s_per_gpu("mnist") == pytest.approx(158.73, abs=0.01)
    assert gc.authors_img_per_s_per_gpu("cifar10") == pytest.approx(12.63, abs=0.01)
    assert gc.authors_img_per_s_per_gpu("fmnist-cpu") is None
    got = gc.with_authors_reference("mnist", {"img_per_s": 317.5, "step_ms": 100.8})
    assert got["ratio_vs_authors_published"] == 2.0 and got["authors_published_img_per_s_per_v100"] == 158.7
    assert "2 V100s" in got["authors_published_from"] and got["step_ms"] == 100.8
    assert gc.with_authors_reference("fmnist-cpu", {"img_per_s": 1.0}) == {"img_per_s": 1.0}
