"""FID: our statistics and distance equal pytorch-fid's own functions on the same images, reference statistics
are cached and reused, and statistics of another dataset, of other files or of other Inception weights are
refused. The Inception weights are random (He-scaled, so that features do not vanish), made here in pytorch-fid's
architecture: the real file cannot be downloaded in tests."""

import json
from unittest import mock

import numpy as np
import pytest
import pytorch_fid.fid_score as pfs
import pytorch_fid.inception as pfi
import torch
from PIL import Image

from cli.main import main
from common.errors import ConfigError, DataError
from common.files import file_sha256
from inference import fid


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    """(path, sha256) of a random state dict of pytorch-fid's FID Inception network."""
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    return path, fid.write_random_weights(path)


@pytest.fixture(scope="session")
def net(weights):
    return fid.load_inception(*weights)


@pytest.fixture(scope="session")
def reference(fmnist64, net):
    """fmnist64's statistics, in the suite's cache."""
    return fid.dataset_statistics(fmnist64, net)


def _their_net(weights):
    """pytorch-fid's InceptionV3, its weights loaded by pytorch-fid from the file."""
    state = torch.load(weights[0], weights_only=True)
    with mock.patch.object(pfi, "load_state_dict_from_url", lambda *a, **k: state):
        return pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()


def _png_files(images_uint8, folder):
    """(N, H, W, C) uint8 images as PNG files, the input pytorch-fid's own functions read."""
    folder.mkdir()
    files = []
    for i, im in enumerate(images_uint8):
        path = folder / f"{i:04d}.png"
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(path)
        files.append(str(path))
    return files


def _their_statistics(weights, images_uint8, folder):
    files = _png_files(images_uint8, folder)
    return pfs.calculate_activation_statistics(files, _their_net(weights), batch_size=50, dims=2048,
                                               device="cpu", num_workers=0)  # fmt: skip


def test_features_are_not_degenerate(reference):
    # A test over vanishing features would pass for any code: the random network must spread them.
    assert reference.meta["images"] == 64 and reference.meta["dataset"] == "fashion-mnist"
    assert np.sqrt(np.diag(reference.sigma)).mean() > 1e-2 * max(1e-12, np.abs(reference.mu).mean())
    assert np.abs(reference.mu).max() > 1e-3


def test_dataset_statistics_equal_pytorch_fid_on_the_same_images(fmnist64, weights, reference, tmp_path):
    from data.loaders import load_split

    train = np.asarray(load_split(fmnist64, "train"))
    mu, sigma = _their_statistics(weights, train, tmp_path / "png")
    np.testing.assert_allclose(reference.mu, mu, rtol=1e-6, atol=1e-6 * np.abs(mu).max())
    np.testing.assert_allclose(reference.sigma, sigma, rtol=1e-6, atol=1e-6 * np.abs(sigma).max())


def test_sample_fid_equals_pytorch_fid_computed_from_files(weights, net, reference, fmnist64, tmp_path):
    pool = np.random.default_rng(0).integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)

    def draw(n, seed):  # images that a PNG file holds exactly, chosen by the seed
        idx = np.random.default_rng(seed).choice(len(pool), n, replace=False)
        drawn.append(pool[idx])
        return torch.from_numpy(pool[idx]).permute(0, 3, 1, 2).float() / 255

    drawn = []
    source = fid.Samples(draw, "fashion-mnist", (1, 28, 28), "checkpoint", {"bn_readjusted": False,
                                                                            "bn_temperature": None})  # fmt: skip
    got = fid.sample_fid(source, reference, net, n=30, temperature=0.8, batch_size=12, seed=3)
    assert [len(d) for d in drawn] == [12, 12, 6]
    # pytorch-fid end to end: statistics of both image sets from files, then its distance.
    from data.loaders import load_split

    mu1, s1 = _their_statistics(weights, np.concatenate(drawn), tmp_path / "samples")
    mu2, s2 = _their_statistics(weights, np.asarray(load_split(fmnist64, "train")), tmp_path / "train")
    expected = pfs.calculate_frechet_distance(mu1, s1, mu2, s2)
    assert got["fid"] == pytest.approx(expected, rel=1e-6)
    assert got["fid"] > 0
    assert (got["fid_samples"], got["fid_temperature"], got["fid_bn_readjusted"]) == (30, 0.8, False)
    assert got["fid_reference"]["dataset"] == "fashion-mnist" and got["fid_reference"]["images"] == 64


def test_statistics_are_reused_not_recomputed(fmnist64, net, reference):
    with mock.patch.object(fid, "features", side_effect=AssertionError("recomputed")):
        again = fid.dataset_statistics(fmnist64, net)
    assert again.reused and again.path == reference.path
    np.testing.assert_array_equal(again.sigma, reference.sigma)
    # Another count is another file: it is computed.
    with mock.patch.object(fid, "features", side_effect=AssertionError("recomputed")):
        with pytest.raises(AssertionError, match="recomputed"):
            fid.dataset_statistics(fmnist64, net, max_images=10)


def test_statistics_of_another_dataset_files_or_network_are_refused(reference, net, fmnist64):
    ok = {"dataset": "fashion-mnist", "image_shape": (1, 28, 28), "inception_sha256": net.sha256}
    fid.check_reference(reference, **ok)
    with pytest.raises(ConfigError, match="statistics of 'fashion-mnist', but the model is for 'cifar10'"):
        fid.check_reference(reference, **{**ok, "dataset": "cifar10"})
    with pytest.raises(ConfigError, match=r"\(1, 28, 28\) images, but the model makes \(1, 32, 32\)"):
        fid.check_reference(reference, **{**ok, "image_shape": (1, 32, 32)})
    with pytest.raises(ConfigError, match="computed with Inception weights"):
        fid.check_reference(reference, **{**ok, "inception_sha256": "0" * 64})
    other_files = {**reference.meta, "splits": {"train": "f" * 64}}
    with pytest.raises(ConfigError, match="other fashion-mnist files"):
        fid.check_reference(reference, **ok, data_meta=other_files)


def test_unreadable_statistics_are_data_errors(tmp_path):
    np.savez(tmp_path / "plain.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(DataError, match="plain.npz: not FID statistics"):
        fid.read_reference(tmp_path / "plain.npz")
    with pytest.raises(DataError, match="no such statistics file"):
        fid.read_reference(tmp_path / "missing.npz")


def test_weights_are_checked_and_never_downloaded(tmp_path, weights):
    with pytest.raises(ConfigError, match=f"no such file.*{fid.WEIGHTS_URL}"):
        fid.fetch_weights(tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match=f"--inception-sha256 {weights[1]}"):
        fid.fetch_weights(weights[0])  # random weights are not pytorch-fid's file
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="not the FID Inception network"):
        fid.load_inception(tmp_path / "other.pth", file_sha256(tmp_path / "other.pth"))


def test_onnx_sources_need_the_mean_image_and_keep_their_bn():
    class Sampler:
        path, decode, image_shape = "d.onnx", "sample", (1, 28, 28)
        metadata = {
            "nvae.config": json.dumps({"dataset": "fashion-mnist"}),
            "nvae.bn_readjust_temperature": "0.7",
        }

    with pytest.raises(ConfigError, match="decode=sample"):
        fid.onnx_samples(Sampler(), 0.7)
    Sampler.decode = "mean"
    with pytest.raises(ConfigError, match="readjust the checkpoint before export"):
        fid.onnx_samples(Sampler(), 0.7, readjust=True)
    got = fid.onnx_samples(Sampler(), 0.7)
    assert (got.dataset, got.bn) == ("fashion-mnist", {"bn_readjusted": True, "bn_temperature": 0.7})


def test_cli_fid_of_a_checkpoint_writes_metrics(tmp_path, fmnist64, weights, reference, make_tiny, capsys):
    from model.checkpoint import save_checkpoint
    from model.network import NVAE

    torch.manual_seed(0)
    ckpt = tmp_path / "c.pt"
    save_checkpoint(ckpt, NVAE(make_tiny(data_size=28, image_size=32)))
    out = tmp_path / "fid.json"
    common = ["--inception", str(weights[0]), "--inception-sha256", weights[1]]
    rc = main(["fid", "--checkpoint", str(ckpt), "--data", str(fmnist64), *common, "--n", "10", "--batch-size",
               "5", "--temperature", "0.9", "--readjust-bn", "--readjust-iters", "3", "--out", str(out)])  # fmt: skip
    assert rc == 0
    m = json.loads(out.read_text())
    assert m["fid"] > 0 and m["fid_samples"] == 10 and m["fid_temperature"] == 0.9
    assert m["fid_bn_readjusted"] is True and m["fid_bn_temperature"] == 0.9
    assert m["fid_reference"]["path"] == str(reference.path)  # the cached statistics
    assert "FID " in capsys.readouterr().out
    # Statistics of another dataset are one line and exit 2, and write nothing.
    other = fid.Reference(reference.mu, reference.sigma, {**reference.meta, "dataset": "mnist"})
    fid.write_reference(other, tmp_path / "mnist.npz")
    out.unlink()
    rc = main(["fid", "--checkpoint", str(ckpt), "--stats", str(tmp_path / "mnist.npz"), *common, "--n", "4",
               "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "statistics of 'mnist'" in err and len(err.splitlines()) == 1
    assert not out.exists()
    # Prepared data of another shape is refused before its statistics are computed.
    small = tmp_path / "small.pt"
    save_checkpoint(small, NVAE(make_tiny()))  # fashion-mnist at 12x12
    with mock.patch.object(fid, "dataset_statistics", side_effect=AssertionError("computed")):
        rc = main(["fid", "--checkpoint", str(small), "--data", str(fmnist64), *common, "--n", "4",
                   "--readjust-bn", "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "(1, 28, 28) images, but the model makes 'fashion-mnist' (1, 12, 12)" in err


def test_cli_missing_weights_is_one_line(tmp_path, fmnist64, capsys):
    rc = main(["fid-stats", "--data", str(fmnist64), "--inception", str(tmp_path / "none.pth")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and fid.WEIGHTS_URL in err


def test_cli_fid_off_writes_a_record_and_reads_nothing(tmp_path, capsys):
    out = tmp_path / "fid.json"
    assert main(["fid", "--onnx", "missing.onnx", "--inception", "", "--n", "0", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == {"fid": None, "fid_samples": 0, "fid_temperature": 1.0}
    assert "not computed" in capsys.readouterr().out
