import json
import math

import numpy as np
import pytest
import torch

from cli.main import main
from common.errors import ConfigError
from inference.evaluate import evaluate, iw_batch
from inference.readjust import readjust_bn
from inference.sample import fixed_scale_rows, nearest_neighbours
from model.checkpoint import load_model, save_checkpoint
from model.network import NVAE
from model.prior_sampling import sample_images
from model.regularizers import bn_layers


def _trained_bn(model, x, steps=3):
    """Move BN statistics away from their init with a few train-mode passes (no optimisation needed)."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)
    return model.eval()


@pytest.fixture
def model_and_data(tiny_cfg):
    torch.manual_seed(0)
    model = NVAE(tiny_cfg)
    x = torch.randint(0, 256, (6, 1, 12, 12)).float() / 255
    return _trained_bn(model, x), x


def test_iw_bound_is_at_least_the_elbo(model_and_data):
    model, x = model_and_data  # with flows, the ELBO here is the mean of the same log-weights
    res = iw_batch(model, x, k=8, chunk=4, generator=torch.Generator().manual_seed(0))
    assert (res.log_px >= res.elbo - 1e-4).all()
    assert (res.log_px > res.elbo).any()


def test_iw_bound_rises_with_k_on_average(model_and_data):
    model, x = model_and_data
    k1 = torch.stack([iw_batch(model, x, 1, 1, torch.Generator().manual_seed(s)).log_px for s in range(8)])
    k32 = torch.stack([iw_batch(model, x, 32, 32, torch.Generator().manual_seed(s)).log_px for s in range(2)])
    assert k32.mean() > k1.mean()


def test_chunked_equals_sequential_for_the_same_draws(model_and_data):
    model, x = model_and_data
    seq = iw_batch(model, x, 6, 1, torch.Generator().manual_seed(3))
    chunked = iw_batch(model, x, 6, 4, torch.Generator().manual_seed(3))
    assert torch.allclose(seq.log_px, chunked.log_px, atol=1e-3, rtol=1e-5)
    assert torch.allclose(seq.elbo, chunked.elbo, atol=1e-3, rtol=1e-5)


def test_a_pass_that_cannot_fit_in_memory_is_refused_before_the_work(monkeypatch):
    """One pass of chunk x batch images is measured (passes of 1 and 4 images) and refused, naming --chunk,
    when it needs more than is available; a pass that fits goes ahead."""
    import inference.evaluate as ev
    from model.config import get_preset

    torch.manual_seed(0)
    model = NVAE(get_preset("fmnist-cpu")).eval()
    x = torch.rand(16, 1, 28, 28)
    need = ev.check_pass_memory(model, x, 64)
    assert 64 * 16 * 2**20 < need < 64 * 16 * 20 * 2**20  # about 2-4 MiB per image measured here
    monkeypatch.setattr(ev, "available_memory", lambda device: need // 10)
    with pytest.raises(ConfigError, match=r"one pass of 64 samples x 16 images needs about .* lower --chunk"):
        ev.check_pass_memory(model, x, 64)
    with pytest.raises(ConfigError, match="lower --chunk"):
        evaluate(model, [x], k=64, chunk=64, progress=False)
    assert ev.check_pass_memory(model, x[:1], 4) == 0  # four images: nothing to measure


@pytest.mark.parametrize("peak_reset", [True, False])
def test_the_pass_peak_is_measured_with_and_without_resetting_the_kernels_peak(monkeypatch, peak_reset):
    """From VmHWM reset before the pass where /proc allows it, else from the resident size after every layer:
    both see a pass of 64 images take more than one of 4."""
    import inference.evaluate as ev
    from model.config import get_preset

    if not peak_reset:
        monkeypatch.setattr(ev, "_reset_peak_resident", lambda: False)
    elif not ev._reset_peak_resident():
        pytest.skip("/proc/self/clear_refs is not writable here")
    torch.manual_seed(0)
    model = NVAE(get_preset("fmnist-cpu")).eval()
    x = torch.rand(1, 1, 28, 28)
    with torch.no_grad():
        small, large = ev._pass_peak(model, x, 4), ev._pass_peak(model, x, 64)
    assert large > small and large > 64 * 2**20  # several MiB per image of fmnist-cpu


def test_iw_progress_counts_every_pass(model_and_data):
    model, x = model_and_data
    seen = []
    iw_batch(model, x, 10, 4, torch.Generator().manual_seed(0), on_chunk=seen.append)
    assert seen == [4 * 6, 4 * 6, 2 * 6]


def test_evaluate_reports_bits_per_dim_and_active_channels(model_and_data):
    model, x = model_and_data
    m = evaluate(model, [x[:4], x[4:]], k=4, progress=False)
    assert m["num_images"] == 6 and m["iw_samples"] == 4
    assert m["nll_bpd"] == pytest.approx(m["nll_nats"] / (math.log(2) * 144))
    assert m["nll_bpd"] <= m["nelbo_bpd"] + 1e-6
    assert (
        len(m["kl_per_group"]) == model.num_groups and len(m["active_channels_per_group"]) == model.num_groups
    )
    assert 0 <= m["active_channels"] <= m["latent_channels"] == sum(s[0] for s in model.latent_shapes())
    assert sum(m["kl_per_group"]) == pytest.approx(m["kl_nats"], rel=1e-5)
    assert evaluate(model, [x], k=4, limit=2, progress=False)["num_images"] == 2


def test_readjust_touches_only_decoder_side_bn(model_and_data):
    model, _ = model_and_data
    before = {id(m): m.running_mean.clone() for m in bn_layers(model)}
    settings = readjust_bn(model, 0.7, iters=3, batch=4, progress=False)
    assert settings["temperature"] == 0.7 and settings["iters"] == 3 and not model.training
    decoder_side = {
        id(m) for mod in (model.dec_groups, model.dec_up, model.postprocess) for m in bn_layers(mod)
    }
    for m in bn_layers(model):
        changed = not torch.equal(before[id(m)], m.running_mean)
        assert changed == (id(m) in decoder_side)


def test_readjust_with_overflowing_samples_writes_nothing(model_and_data, tmp_path, capsys):
    """Samples that overflow on the sampling path would leave non-finite BN statistics, and every sample of
    the readjusted checkpoint would be NaN: refused with one line, and no checkpoint is written."""
    model, _ = model_and_data
    path = [m for mod in (model.dec_groups, model.dec_up, model.postprocess) for m in mod.modules()]
    with torch.no_grad():  # gains of e**100: float32 overflows on the first sampling pass
        for conv in (m for m in path if getattr(m, "log_g", None) is not None):
            conv.log_g.fill_(100.0)
    save_checkpoint(tmp_path / "ckpt.pt", model)
    out = tmp_path / "bn" / "checkpoint_bn.pt"
    argv = ["readjust-bn", "--checkpoint", str(tmp_path / "ckpt.pt"), "--out", str(out), "--iters", "2"]
    assert main([*argv, "--batch", "2", "--temperature", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "non-finite statistics" in err and "lower --temperature" in err, err
    assert not out.exists()


def test_inference_loops_normalise_each_weight_once(model_and_data, monkeypatch):
    """Evaluation, readjustment and sampling compute each conv's weight norm once per call, whatever the
    number of passes, and give the same numbers as a weight norm in every pass."""
    import contextlib

    import inference.evaluate
    from model.layers import WNConv2d

    model, x = model_and_data
    with monkeypatch.context() as m:
        m.setattr(inference.evaluate, "shared_effective_weights", lambda model: contextlib.nullcontext())
        per_pass = iw_batch(model, x, 6, 2, torch.Generator().manual_seed(3))
    calls = []
    original = WNConv2d._normalised_weight
    monkeypatch.setattr(WNConv2d, "_normalised_weight", lambda self: calls.append(self) or original(self))
    n_convs = sum(isinstance(m, WNConv2d) for m in model.modules())
    runs = {
        "iw_batch, 3 chunks": lambda: iw_batch(model, x, 6, 2, torch.Generator().manual_seed(3)),
        "evaluate, 2 batches x 2 chunks": lambda: evaluate(
            model, [x[:3], x[3:]], k=2, chunk=1, progress=False
        ),
        "readjust, 4 passes": lambda: readjust_bn(model, 1.0, iters=4, batch=2, progress=False),
        "sample, 3 batches": lambda: sample_images(model, 5, 1.0, seed=1, batch_size=2),
    }
    for name, run in runs.items():
        calls.clear()
        out = run()
        assert 0 < len(calls) <= n_convs, name
        if name.startswith("iw_batch"):
            torch.testing.assert_close(out.log_px, per_pass.log_px, rtol=0, atol=0)
    assert all(m._weight_cache is None for m in model.modules() if isinstance(m, WNConv2d))
    monkeypatch.setattr(inference.evaluate, "shared_effective_weights", lambda m: contextlib.nullcontext())
    calls.clear()
    iw_batch(model, x, 6, 2, torch.Generator().manual_seed(3))
    assert len(calls) > 2 * n_convs  # the same call without the block: once per pass


def test_sampling_is_seeded_and_fix_scales_rows(model_and_data):
    model, _ = model_and_data
    a = sample_images(model, 5, 0.8, seed=1)
    assert torch.equal(a, sample_images(model, 5, 0.8, seed=1))
    assert not torch.equal(a, sample_images(model, 5, 0.8, seed=2))
    assert a.shape == (5, 1, 12, 12) and a.min() >= 0 and a.max() <= 1
    rows = fixed_scale_rows(model, 4, 0.8).view(model.cfg.num_scales + 1, 4, 1, 12, 12)
    assert all(torch.equal(rows[-1, 0], r) for r in rows[-1])  # every scale fixed: identical images
    assert not torch.equal(rows[0, 0], rows[0, 1])  # nothing fixed: different images


def test_nearest_neighbours_finds_the_duplicate():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (50, 16, 16, 1), dtype=np.uint8)
    idx = nearest_neighbours(train[[7, 30]], train, k=3, chunk=16)
    assert idx[:, 0].tolist() == [7, 30]


# ------------------------------------------------------------------------------------ CLI, end to end
@pytest.fixture
def fmnist_ckpt(tmp_path, make_tiny):
    torch.manual_seed(0)
    model = NVAE(make_tiny(data_size=28, image_size=32))
    _trained_bn(model, torch.rand(4, 1, 28, 28))
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, extra={"step": 5})
    return path


def test_cli_evaluate_readjust_sample_nearest(tmp_path, fmnist64, fmnist_ckpt, capsys):
    metrics = tmp_path / "m.json"
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(fmnist_ckpt),
                "--data",
                str(fmnist64),
                "--iw-samples",
                "3",
                "--limit",
                "8",
                "--out",
                str(metrics),
                "--kl-plot",
                str(tmp_path / "kl.png"),
            ]
        )
        == 0
    )
    m = json.loads(metrics.read_text())
    assert m["num_images"] == 8 and m["iw_samples"] == 3 and m["likelihood_edge"] == "correct"
    assert m["dataset"] == "fashion-mnist" and len(m["checkpoint_sha256"]) == 64
    assert (tmp_path / "kl.png").read_bytes()[:4] == b"\x89PNG"

    adj = tmp_path / "adj.pt"
    assert (
        main(
            [
                "readjust-bn",
                "--checkpoint",
                str(fmnist_ckpt),
                "--temperature",
                "0.7",
                "--iters",
                "2",
                "--batch",
                "4",
                "--out",
                str(adj),
            ]
        )
        == 0
    )
    _, payload = load_model(adj)
    assert payload["bn_readjust"]["temperature"] == 0.7 and payload["step"] == 5

    out = tmp_path / "s"
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(adj),
                "--n",
                "6",
                "--temperature",
                "0.7",
                "1.0",
                "--out",
                str(out),
                "--fix-scales",
                "--reconstruct",
                "--data",
                str(fmnist64),
            ]
        )
        == 0
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "fixed_scales_t0.7.png",
        "fixed_scales_t1.png",
        "grid_t0.7.png",
        "grid_t1.png",
        "reconstructions.png",
        "samples.npz",
    ]
    with np.load(out / "samples.npz") as z:
        assert z["images_t0.7"].shape == (6, 28, 28, 1) and z["images_t0.7"].dtype == np.uint8
        first = z["images_t0.7"].copy()
    assert (
        main(
            [
                "sample",
                "--checkpoint",
                str(adj),
                "--n",
                "6",
                "--temperature",
                "0.7",
                "--out",
                str(tmp_path / "s2"),
            ]
        )
        == 0
    )
    with np.load(tmp_path / "s2" / "samples.npz") as z:
        assert np.array_equal(z["images_t0.7"], first)  # same seed, same images

    assert (
        main(
            [
                "nearest",
                "--samples",
                str(out / "samples.npz"),
                "--data",
                str(fmnist64),
                "--k",
                "2",
                "--out",
                str(tmp_path / "nn.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "nn.png").exists()


def test_cli_bad_inputs_fail_before_work(tmp_path, fmnist64, fmnist_ckpt, make_tiny, capsys):
    other = NVAE(make_tiny(dataset="mnist", data_size=28, image_size=32))
    save_checkpoint(tmp_path / "other.pt", other)
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                str(tmp_path / "other.pt"),
                "--data",
                str(fmnist64),
                "--iw-samples",
                "2",
                "--out",
                str(tmp_path / "m.json"),
            ]
        )
        == 2
    )
    assert "holds 'fashion-mnist' but the checkpoint's model is for 'mnist'" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()
    for argv in (
        ["evaluate", "--checkpoint", "c", "--data", "d", "--iw-samples", "0", "--out", "m"],
        ["readjust-bn", "--checkpoint", "c", "--temperature", "0", "--out", "o"],
        ["sample", "--checkpoint", "c", "--temperature", "-1", "--out", "o"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--iw-samples must be >= 1" in err and "temperature must be in (0, 10]" in err
    assert main(["sample", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
