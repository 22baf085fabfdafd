import json
import zipfile

import pytest
import torch

from cli.main import main
from common.errors import CheckpointError
from model.checkpoint import load_model, read_checkpoint, save_checkpoint
from model.network import NVAE


def test_round_trip_weights_only(tmp_path, tiny_cfg):
    model = NVAE(tiny_cfg)
    model.spectral_loss()
    path = tmp_path / "c.pt"
    save_checkpoint(path, model, extra={"step": 7})
    raw = torch.load(path, weights_only=True)
    assert raw["version"] == 1 and json.loads(raw["config"])["channels"] == tiny_cfg.channels
    assert any(k.endswith(".mask") for k in raw["model"])  # AR masks travel as buffers
    loaded, payload = load_model(path)
    assert payload["step"] == 7 and loaded.cfg == tiny_cfg
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_config_that_does_not_match_weights_fails_clearly(tmp_path, make_tiny):
    model = NVAE(make_tiny())
    path = tmp_path / "c.pt"
    save_checkpoint(path, model)
    payload = torch.load(path, weights_only=True)
    cfg = json.loads(payload["config"])
    cfg["channels"] = 10
    payload["config"] = json.dumps(cfg)
    torch.save(payload, path)
    with pytest.raises(
        CheckpointError, match="weights do not match the checkpoint's config.*shape mismatches"
    ):
        load_model(path)


def test_truncated_or_foreign_files_are_rejected(tmp_path, tiny_cfg):
    path = tmp_path / "c.pt"
    save_checkpoint(path, NVAE(tiny_cfg))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_checkpoint(path)
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not an nvae-pipeline checkpoint"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "missing.pt")
    assert zipfile.is_zipfile(path)


@pytest.mark.parametrize(
    "command",
    [
        ["evaluate", "--data", "@d", "--out", "@m.json"],
        ["sample", "--out", "@s"],
        ["export-onnx", "--out", "@d.onnx"],
        ["readjust-bn", "--temperature", "0.8", "--out", "@b.pt"],
    ],
)
def test_a_file_of_random_bytes_is_one_short_line_for_every_command(tmp_path, capsys, command):

    path = tmp_path / "random.pt"
    path.write_bytes(bytes(range(256)) * 20)
    rest = [str(tmp_path / a[1:]) if a.startswith("@") else a for a in command[1:]]
    try:
        rc = main([command[0], "--checkpoint", str(path), *rest])
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert f"{path}: not a readable checkpoint" in err and "weights_only" not in err and len(err) < 200


def test_failed_save_keeps_previous_checkpoint(tmp_path, tiny_cfg, monkeypatch):
    path = tmp_path / "c.pt"
    model = NVAE(tiny_cfg)
    save_checkpoint(path, model, extra={"step": 1})
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, extra={"step": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"step": "40"}, 'step: expected an integer >= 0, got "40"'),
        ({"step": True}, "step: expected an integer >= 0, got true"),
        ({"step": -1}, "step: expected an integer >= 0, got -1"),
        ({"bn_readjust": {"temperature": -0.7}}, "bn_readjust.temperature: expected a finite number > 0, got -0.7"),
        ({"bn_readjust": "0.7"}, 'bn_readjust: expected the settings of `nvae readjust-bn`, got "0.7"'),
        ({"grad_accum": 0}, "grad_accum: expected an integer > 0, got 0"),
    ],
)  # fmt: skip
def test_checkpoint_metadata_of_the_wrong_type_is_one_line_naming_the_field(tmp_path, tiny_cfg, capsys, extra, says):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, NVAE(tiny_cfg), extra=extra)
    assert main(["export-onnx", "--checkpoint", str(path), "--out", str(tmp_path / "d.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"nvae export-onnx: error: {path}: {says}"
    assert not (tmp_path / "d.onnx").exists()
