"""Samples to files (`sample_to_dir`, `nearest_grid`) and the metrics plot from a file: what they write and
return, and that bad input is the product's own error, raised before any work."""

import logging

import numpy as np
import pytest
import torch

from common.errors import ConfigError, DataError, NVAEError
from data.images import to_uint8
from inference.evaluate import plot_kl_file
from inference.sample import nearest_grid, sample_to_dir
from model.checkpoint import save_checkpoint
from model.network import NVAE


class FakeSampler:
    """Stands in for serving's ONNX sampler: seeded uniform images of one shape."""

    decode = "mean"
    image_shape = (1, 4, 4)
    providers = ["CPUExecutionProvider"]

    def sample(self, n: int, temperature: float, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return rng.random((n, *self.image_shape), dtype=np.float32) * temperature


def test_onnx_samples_are_written_and_listed_in_order(tmp_path):
    opened = []

    def open_onnx(path, providers):
        opened.append((path, providers))
        return FakeSampler()

    out = tmp_path / "s"
    result = sample_to_dir(out, temperatures=[0.5, 1.0], onnx="d.onnx", open_onnx=open_onnx, n=3)
    assert opened == [("d.onnx", "auto")]  # no --device: CUDA if it loads
    assert result.providers == ["CPUExecutionProvider"]
    assert result.written == [out / "grid_t0.5.png", out / "grid_t1.png", out / "samples.npz"]
    assert sorted(p.name for p in out.iterdir()) == ["grid_t0.5.png", "grid_t1.png", "samples.npz"]
    with np.load(out / "samples.npz") as z:
        assert z["temperatures"].tolist() == [0.5, 1.0]
        assert np.array_equal(z["images_t0.5"], to_uint8(FakeSampler().sample(3, 0.5, 0)))
        assert z["images_t1"].shape == (3, 4, 4, 1) and z["images_t1"].dtype == np.uint8


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"checkpoint": "c.pt", "onnx": "d.onnx"}, "exactly one of --checkpoint or --onnx"),
        ({}, "exactly one of --checkpoint or --onnx"),
        ({"onnx": "d.onnx", "fix_scales": True}, "need --checkpoint"),
        ({"checkpoint": "c.pt", "reconstruct": True}, "--reconstruct needs --data"),
        ({"onnx": "d.onnx", "n": 10**9}, "at most"),
        ({"onnx": "d.onnx", "decode": "sample"}, "exported with decode=mean"),
    ],
)
def test_bad_sample_options_are_config_errors_and_write_nothing(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message) as exc:
        sample_to_dir(
            tmp_path / "s", temperatures=[1.0], open_onnx=lambda path, providers: FakeSampler(), **options
        )
    assert isinstance(exc.value, NVAEError)  # one line and exit 2 from the CLI
    assert not (tmp_path / "s").exists()


def test_checkpoint_samples_warn_about_training_bn_statistics(tmp_path, make_tiny, caplog):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "c.pt", NVAE(make_tiny(data_size=28, image_size=32)))
    with caplog.at_level(logging.WARNING, logger="inference.sample"):
        result = sample_to_dir(
            tmp_path / "s", temperatures=[1.0], checkpoint=tmp_path / "c.pt", n=2, device="cpu"
        )
    assert result.providers is None
    assert [p.name for p in result.written] == ["grid_t1.png", "samples.npz"]
    assert "BN statistics are the training averages" in caplog.text


def test_unreadable_inputs_are_data_errors(tmp_path):
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="not a readable samples .npz"):
        nearest_grid(broken, tmp_path / "data", tmp_path / "nn.png")
    binary = tmp_path / "metrics.json"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(DataError, match="not a text file"):
        plot_kl_file(binary, tmp_path / "kl.png")
    binary.write_text('{"nll_bpd": 1.0}')
    with pytest.raises(DataError, match="num_images: missing"):
        plot_kl_file(binary, tmp_path / "kl.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.npz", "metrics.json"]


def test_a_temperature_whose_samples_are_not_finite_writes_nothing(tmp_path, make_tiny, monkeypatch):
    """Every temperature is drawn before any grid is written: the first (fine) one leaves no file when a later
    one overflows."""
    import inference.sample as sample_module

    torch.manual_seed(0)
    ckpt = tmp_path / "c.pt"
    save_checkpoint(ckpt, NVAE(make_tiny()))
    real = sample_module.sample_images

    def overflowing(model, n, t, seed, **kw):
        images = real(model, n, t, seed, **kw)
        return images * float("inf") if t > 5 else images

    monkeypatch.setattr(sample_module, "sample_images", overflowing)
    with pytest.raises(ConfigError, match=r"--temperature 8: the decoder's output is not finite"):
        sample_to_dir(tmp_path / "s", temperatures=[1.0, 8.0], checkpoint=ckpt, n=2)
    assert not (tmp_path / "s").exists()


def test_temperatures_above_the_servers_limit_are_refused_in_one_line(capsys):
    from cli.main import main

    with pytest.raises(SystemExit) as caught:
        main(["sample", "--checkpoint", "c.pt", "--out", "s", "--temperature", "1e30"])
    assert caught.value.code == 2
    assert "temperature must be in (0, 10], got 1e30" in capsys.readouterr().err
