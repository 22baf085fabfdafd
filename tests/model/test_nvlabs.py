"""The authors' checkpoint format: import (strict, safe), export, and the committed file made by their code.

`nvlabs/tiny-mnist.pt` was written by the authors' own `AutoEncoder` and `torch.save` (NVlabs/NVAE 9fc1a28),
with the figures their forward pass gave on fixed inputs and noise in `tiny-mnist.json` (how it was made:
nvlabs/README.md). No checkout is needed here."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from cli.main import main
from common.errors import CheckpointError
from inference.nvlabs import export_nvlabs_file, import_nvlabs_file
from model.checkpoint import load_model
from model.nvlabs import config_from_args, dmol_head_order, import_nvlabs, load_nvlabs_file, weight_map
from training.train import make_optimizer

HERE = Path(__file__).parent / "nvlabs"
FILE = HERE / "tiny-mnist.pt"
RECORD = json.loads((HERE / "tiny-mnist.json").read_text())


def _nvae(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def authors() -> dict:
    """The committed authors' checkpoint, loaded (a fresh copy per test, to damage)."""
    return load_nvlabs_file(FILE)


def _save(tmp_path: Path, payload: dict, name: str = "theirs.pt") -> Path:
    path = tmp_path / name
    torch.save(payload, path)
    return path


# --- the committed file ----------------------------------------------------------------------------------------


def test_the_committed_file_is_what_its_record_says():
    import hashlib

    assert hashlib.sha256(FILE.read_bytes()).hexdigest() == RECORD["sha256"]
    assert FILE.stat().st_size < 8 * 2**20


def test_the_authors_file_imports_and_gives_their_elbo(tmp_path, capsys):
    out = tmp_path / "ours.pt"
    rc, stdout, err = _nvae(capsys, "import-nvlabs", str(FILE), "--out", str(out))
    assert rc == 0, err
    assert "imported mnist" in stdout and "epoch 17, step 2550" in stdout and "BN names: sync" in stdout
    assert "with its optimizer state" in stdout
    model, payload = load_model(out)
    assert payload["imported_from"]["sha256"] == RECORD["sha256"]
    assert model.cfg.dmol_edge == "released" and model.cfg.num_nf == 1 and model.cfg.ada_groups
    inputs = torch.load(HERE / RECORD["inputs"], weights_only=True)
    model.eval()
    with torch.no_grad():
        o = model(inputs["x"], eps=inputs["eps"])
        elbo = -(model.reconstruction_nll(o.logits, inputs["x"]) + torch.stack(o.kl_all, 1).sum(1))
    expected = torch.tensor(RECORD["authors_elbo_nats_eval"])
    assert torch.allclose(elbo, expected, rtol=1e-5, atol=0), (elbo, expected)


def test_an_imported_model_works_with_the_other_commands(tmp_path, capsys):
    ours = tmp_path / "ours.pt"
    assert _nvae(capsys, "import-nvlabs", str(FILE), "--out", str(ours))[0] == 0
    readjusted = tmp_path / "readjusted.pt"
    rc, _, err = _nvae(capsys, "readjust-bn", "--checkpoint", str(ours), "--temperature", "0.8", "--iters", "2",
                       "--batch", "4", "--out", str(readjusted))  # fmt: skip
    assert rc == 0, err
    rc, _, err = _nvae(
        capsys, "sample", "--checkpoint", str(readjusted), "--n", "4", "--out", str(tmp_path / "s")
    )
    assert rc == 0, err
    assert list((tmp_path / "s").glob("*.png"))
    rc, _, err = _nvae(
        capsys, "export-onnx", "--checkpoint", str(readjusted), "--out", str(tmp_path / "d.onnx")
    )
    assert rc == 0, err and (tmp_path / "d.onnx").stat().st_size > 0


# --- both ways ------------------------------------------------------------------------------------------------


def test_theirs_ours_theirs_and_ours_theirs_ours_are_bitwise(tmp_path, authors):
    ours = tmp_path / "ours.pt"
    import_nvlabs_file(FILE, ours)
    back = tmp_path / "back.pt"
    export_nvlabs_file(ours, back)
    exported = load_nvlabs_file(back)
    assert set(exported["state_dict"]) == set(authors["state_dict"])
    for key, tensor in authors["state_dict"].items():
        assert torch.equal(exported["state_dict"][key], tensor), key
    assert vars(exported["args"]) | {} == {**vars(exported["args"])}  # a plain Namespace
    for flag in (
        "dataset",
        "num_channels_enc",
        "num_latent_scales",
        "num_groups_per_scale",
        "num_nf",
        "ada_groups",
    ):
        assert getattr(exported["args"], flag) == getattr(authors["args"], flag), flag

    again = tmp_path / "again.pt"
    import_nvlabs_file(back, again)
    first, second = torch.load(ours, weights_only=True), torch.load(again, weights_only=True)
    assert first["config"] == second["config"]
    assert set(first["model"]) == set(second["model"])
    for key, tensor in first["model"].items():
        assert torch.equal(second["model"][key], tensor), key


def test_an_rgb_mixture_head_is_permuted_exactly_both_ways():
    order = dmol_head_order(10)
    assert sorted(order) == list(range(100))
    # our channel of the blue mean of mixture 4 is their channel-2 block's mean 4
    assert order[10 + 2 * 10 + 4] == 10 + 2 * 30 + 4
    # our coefficient set 1 (blue on red), mixture 0, is their channel-1 block's third part
    assert order[10 + 60 + 10] == 10 + 30 + 20
    cfg = config_from_args(
        argparse.Namespace(**{**vars(load_nvlabs_file(FILE)["args"]), "dataset": "cifar10"})
    )
    assert weight_map(cfg).head_order == order


# --- strictness ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (
            lambda p: p["state_dict"].pop("enc_sampler.1.log_weight_norm"),
            "missing tensor enc_sampler.1.log_weight_norm",
        ),
        (
            lambda p: p["state_dict"].__setitem__("extra.weight", torch.zeros(3)),
            "unexpected tensor extra.weight",
        ),
        (
            lambda p: p["state_dict"].__setitem__("prior_ftr0", torch.zeros(1, 2, 3)),
            "prior_ftr0 has shape (1, 2, 3)",
        ),
        (lambda p: setattr(p["args"], "num_latent_per_group", 5), "has shape"),
        (lambda p: setattr(p["args"], "arch_instance", "res_bnswish"), "args.arch_instance='res_bnswish'"),
        (lambda p: setattr(p["args"], "use_se", False), "args.use_se=False"),
        (lambda p: setattr(p["args"], "num_channels_dec", 16), "args.num_channels_dec=16"),
        (lambda p: setattr(p["args"], "dataset", "svhn"), "args.dataset='svhn'"),
        (lambda p: setattr(p["args"], "num_latent_scales", 9), "args.num_latent_scales=9"),
        (lambda p: delattr(p["args"], "num_nf"), "args.num_nf is missing"),
        (lambda p: p["arch_instance"].__setitem__("normal_dec", ["mconv_e3k5g0"]), "arch_instance"),
    ],
)
def test_a_file_that_does_not_fit_is_one_line_exit_2_and_no_output(tmp_path, capsys, authors, damage, says):
    source, _ = _refused(tmp_path, capsys, authors, damage, says)
    assert list(tmp_path.iterdir()) == [source]


def _refused(tmp_path, capsys, authors, damage, says) -> tuple[Path, Path]:
    """`damage` the authors' file, save it and import it: exit 2, one line saying `says`, nothing written.
    Returns (the damaged file, the output path)."""
    damage(authors)
    source = _save(tmp_path, authors)
    out = tmp_path / "ours.pt"
    rc, _, err = _nvae(capsys, "import-nvlabs", str(source), "--out", str(out))
    assert rc == 2
    assert says in _one_line(err)
    assert not out.exists()
    return source, out


def test_a_cifar10_file_with_a_normal_decoder_is_refused(authors):
    args = argparse.Namespace(**{**vars(authors["args"]), "dataset": "cifar10", "num_mixture_dec": 1})
    with pytest.raises(CheckpointError, match="args.num_mixture_dec=1"):
        config_from_args(args)


def test_an_alias_that_is_not_its_weight_is_refused(authors):
    key = next(k for k in authors["state_dict"] if k.endswith("weight_normalized"))
    authors["state_dict"][key] = authors["state_dict"][key] + 1
    with pytest.raises(CheckpointError, match=f"{key} differs from"):
        import_nvlabs(authors)


def test_plain_batchnorm_names_import_too(authors):
    """A model trained with their SYNC_BN off names its BN layers without the SyncBatchNorm wrapper's `.bn.`."""
    state = authors["state_dict"]
    authors["state_dict"] = {k.replace(".bn.", "."): v for k, v in state.items()}
    imported = import_nvlabs(authors)
    assert imported.bn_form == "plain"
    reference = import_nvlabs(load_nvlabs_file(FILE))
    assert all(
        torch.equal(imported.state[k], v) for k, v in reference.state.items() if not k.startswith("spectral")
    )


def test_a_checkpoint_older_than_a_flag_gets_evaluate_py_defaults(authors):
    args = vars(authors["args"]).copy()
    for flag in ("ada_groups", "min_groups_per_scale", "num_mixture_dec"):
        args.pop(flag)
    cfg = config_from_args(argparse.Namespace(**args))
    assert cfg.ada_groups is False and cfg.min_groups == 1 and cfg.groups_per_scale == [2, 2]


# --- the training state -----------------------------------------------------------------------------------------


def test_their_optimizer_state_takes_the_step_their_optimizer_took(authors):
    """The file holds their fused AdaMax after two steps; the inputs file, the gradients of a third step and
    the weights their optimizer, resumed from the file, gave with them. Ours, from the import, gives the same."""
    from model.network import NVAE

    imported = import_nvlabs(authors)
    training = imported.training
    assert training["step"] == authors["global_step"] == 2550 and training["epoch"] == 17
    assert training["scaler"]["scale"] == authors["grad_scalar"]["scale"]
    assert training["batches_per_epoch"] == 150 and training["total_steps"] == 150 * authors["args"].epochs
    model = NVAE(imported.config)
    model.load_state_dict(imported.state)
    optimizer = make_optimizer(imported.config, model)
    optimizer.load_state_dict(training["optimizer"])
    inputs = torch.load(HERE / RECORD["inputs"], weights_only=True)
    for group in optimizer.param_groups:
        group["lr"] = inputs["step_lr"]
    ours_of = dict(weight_map(imported.config).pairs)
    own = dict(model.named_parameters())
    assert {ours_of[t] for t in inputs["grads"]} == set(own)  # every parameter has its counterpart
    for t, g in inputs["grads"].items():
        own[ours_of[t]].grad = g.clone()
    optimizer.step()
    for t, expected in inputs["after_step"].items():
        assert torch.allclose(own[ours_of[t]].detach(), expected, rtol=0, atol=1e-6), t
    steps = {float(v["step"]) for v in optimizer.state.values()}
    assert steps == {3.0}  # two in the file, one here


def test_their_optimizer_order_matters(authors):
    """Two of their parameters of one shape, swapped in the optimizer's state: the import cannot tell from
    shapes, but the step then differs, which is what the test above would catch."""
    from model.nvlabs import their_parameter_order

    order = their_parameter_order(authors["state_dict"], weight_map(import_nvlabs(authors).config).aliases)
    shapes = [tuple(authors["state_dict"][k].shape) for k in order]
    pairs = [(a, b) for a in range(len(order)) for b in range(a) if shapes[a] == shapes[b]]
    assert pairs, "the test file has parameters of one shape"
    a, b = pairs[0]
    state = authors["optimizer"]["state"]
    state[a], state[b] = state[b], state[a]
    swapped = import_nvlabs(authors).training["optimizer"]["state"]
    reference = import_nvlabs(load_nvlabs_file(FILE)).training["optimizer"]["state"]
    assert any(not torch.equal(swapped[k]["exp_avg"], reference[k]["exp_avg"]) for k in reference)


def _shorten_groups(p):
    p["optimizer"]["param_groups"][0]["params"].pop()


def _misshape(p):
    p["optimizer"]["state"][3]["exp_inf"] = torch.zeros(2, 2)


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (_shorten_groups, "optimizer holds"),
        (_misshape, "optimizer: exp_inf of parameter 3 is (2, 2)"),
        (lambda p: p["optimizer"]["param_groups"][0].__setitem__("eps", 1e-8), "optimizer: eps=1e-08"),
        (lambda p: p["optimizer"]["param_groups"].append({"params": []}), "2 parameter groups"),
        (lambda p: p["optimizer"]["state"][0].pop("exp_avg"), "parameter 0 ("),
        (lambda p: p["grad_scalar"].pop("scale"), "grad_scalar is not a GradScaler state"),
        (lambda p: p.__setitem__("global_step", -1), "global_step=-1"),
    ],
)
def test_a_training_state_that_does_not_fit_is_one_line_exit_2(tmp_path, capsys, authors, damage, says):
    source, out = _refused(tmp_path, capsys, authors, damage, says)
    # --weights-only leaves the state out unread, so the same file imports as weights
    rc, _, err = _nvae(capsys, "import-nvlabs", str(source), "--out", str(out), "--weights-only")
    assert rc == 0, err
    assert "optimizer" not in torch.load(out, weights_only=True)


def test_weights_only_leaves_the_optimizer_out(tmp_path, capsys):
    out, summary = tmp_path / "ours.pt", tmp_path / "summary.json"
    rc, stdout, err = _nvae(capsys, "import-nvlabs", str(FILE), "--out", str(out), "--weights-only",
                            "--summary", str(summary))  # fmt: skip
    assert rc == 0, err
    assert "with its optimizer state" not in stdout
    assert json.loads(summary.read_text())["training_state"] is False
    payload = torch.load(out, weights_only=True)
    assert "optimizer" not in payload and "scaler" not in payload and payload["step"] == 2550
    full = tmp_path / "full.pt"
    import_nvlabs_file(FILE, full)
    assert full.stat().st_size > 2 * out.stat().st_size


# --- safe loading -------------------------------------------------------------------------------------------------


def _touch(path: Path) -> None:
    path.touch()


class _Hostile:
    """Unpickling it would call `_touch(marker)`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


def test_a_file_that_pickles_code_is_refused_and_the_code_never_runs(tmp_path, capsys, authors):
    marker = tmp_path / "ran"
    authors["args"].hook = _Hostile(marker)
    source = _save(tmp_path, authors)
    out = tmp_path / "ours.pt"
    rc, _, err = _nvae(capsys, "import-nvlabs", str(source), "--out", str(out))
    assert rc == 2
    line = _one_line(err)
    assert "refused: it pickles " in line and "_touch" in line
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("content", [b"", b"not a torch file", b"PK\x03\x04truncated"])
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys, content):
    source = tmp_path / "bad.pt"
    source.write_bytes(content)
    rc, _, err = _nvae(capsys, "import-nvlabs", str(source), "--out", str(tmp_path / "o.pt"))
    assert rc == 2 and "not a readable checkpoint" in _one_line(err)


def test_our_own_checkpoint_is_not_taken_for_theirs(tmp_path, capsys):
    ours = tmp_path / "ours.pt"
    import_nvlabs_file(FILE, ours)
    rc, _, err = _nvae(capsys, "import-nvlabs", str(ours), "--out", str(tmp_path / "o.pt"))
    assert rc == 2 and "no state_dict or args entry" in _one_line(err)
