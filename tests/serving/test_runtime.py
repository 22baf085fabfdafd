"""onnxruntime tuned for serving: threads from the container's CPU quota, and no silent CPU fallback when
CUDA was asked for."""

import os

import pytest

from common.errors import NVAEError
from serving.onnx_sampler import OnnxSampler, cpu_limit


def _cgroup(tmp_path, v2=None, v1=None):
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    if v2 is not None:
        (root / "cpu.max").write_text(v2)
    if v1 is not None:
        (root / "cpu").mkdir()
        (root / "cpu" / "cpu.cfs_quota_us").write_text(str(v1[0]))
        (root / "cpu" / "cpu.cfs_period_us").write_text(str(v1[1]))
    return root


def test_threads_follow_the_cpu_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert cpu_limit(_cgroup(tmp_path / "a", v2="200000 100000\n")) == 2  # cgroup v2: 2 CPUs
    assert cpu_limit(_cgroup(tmp_path / "b", v2="150000 100000\n")) == 2  # 1.5 rounds up
    assert cpu_limit(_cgroup(tmp_path / "c", v1=(50000, 100000))) == 1  # cgroup v1: half a CPU
    assert cpu_limit(_cgroup(tmp_path / "d", v2="max 100000\n")) == 64  # no quota: the affinity mask
    assert cpu_limit(_cgroup(tmp_path / "e", v1=(-1, 100000))) == 64
    assert cpu_limit(_cgroup(tmp_path / "f", v2="6400000 100000")) == 64  # never more than the mask


def test_cuda_that_does_not_load_is_an_error_unless_fallback_is_allowed(sampler_file):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the failure path needs a CPU-only build")
    with pytest.raises(NVAEError, match="CUDA provider did not load.*--allow-cpu-fallback"):
        OnnxSampler(sampler_file, providers="cuda")
    s = OnnxSampler(sampler_file, providers="cuda", allow_cpu_fallback=True)
    assert s.providers == ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def sampler_file(tmp_path_factory):
    import torch
    from tiny import TINY

    from inference.export import export_model
    from model.config import apply_overrides, get_preset
    from model.network import NVAE

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_model(
        NVAE(apply_overrides(get_preset("fmnist-cpu"), TINY)), path, exporter="torchscript", verify=False
    )
    return path


def test_the_optimised_graph_is_cached_and_gives_the_same_images(sampler_file, tmp_path):
    import numpy as np

    cache = tmp_path / "ort-cache"
    first = OnnxSampler(sampler_file, "cpu", cache_dir=cache)
    (entry,) = cache.iterdir()
    assert not first.cached and entry.name.startswith("tiny-") and entry.name.endswith(".optimized.onnx")
    second = OnnxSampler(sampler_file, "cpu", cache_dir=cache)
    assert second.cached and second.metadata == first.metadata  # the nvae.* metadata survives
    plain = OnnxSampler(sampler_file, "cpu")
    np.testing.assert_array_equal(second.sample(3, 0.7, seed=4), plain.sample(3, 0.7, seed=4))
    # A damaged entry is rebuilt, not fatal.
    entry.write_bytes(b"not a model")
    third = OnnxSampler(sampler_file, "cpu", cache_dir=cache)
    assert not third.cached and OnnxSampler(sampler_file, "cpu", cache_dir=cache).cached


def test_a_cache_that_cannot_be_written_does_not_stop_the_sampler(sampler_file, tmp_path, caplog):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    s = OnnxSampler(sampler_file, "cpu", cache_dir=blocked)
    assert not s.cached and s.sample(2, 0.8, 0).shape[0] == 2
    assert "starting without the cache" in caplog.text


def test_io_binding_writes_the_same_images_as_a_plain_run(sampler_file):
    import numpy as np

    bound = OnnxSampler(sampler_file, "cpu", io_binding=True)
    plain = OnnxSampler(sampler_file, "cpu", io_binding=False)
    for n, batch in ((1, None), (5, 2), (7, None)):
        np.testing.assert_array_equal(bound.sample(n, 0.8, 9, batch), plain.sample(n, 0.8, 9, batch))
