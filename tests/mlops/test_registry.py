"""The model registry (`nvae model`, common.registry) against a real S3-API server on loopback."""

import json

import pytest
import torch

from cli.main import main
from common.files import file_sha256
from common.registry import Registry, content_version
from common.s3 import s3_client_from_env
from model.checkpoint import save_checkpoint
from model.network import NVAE

from .fake_nvae import write_onnx


@pytest.fixture
def reg(s3_env, request):
    """A registry of its own for each test (the S3 server lives for the session)."""
    s3_env["make_bucket"]("nvae-registry")
    return f"s3://nvae-registry/models/{request.node.name.replace('_', '-')[:40]}"


def write_decoder(path, checkpoint, tag: str = "decoder", record: bool = True) -> None:
    """A small real ONNX decoder that says it was exported from `checkpoint` (unless not `record`)."""
    write_onnx(path, tag, checkpoint if record else None)


@pytest.fixture
def artifacts(tmp_path, make_tiny):
    torch.manual_seed(0)
    ckpt = tmp_path / "checkpoint.pt"
    save_checkpoint(ckpt, NVAE(make_tiny()), extra={"step": 40, "bn_readjust": {"temperature": 0.8}})
    onnx = tmp_path / "decoder.onnx"
    write_decoder(onnx, ckpt)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(
        json.dumps({"nll_bpd": 3.25, "nelbo_bpd": 3.3, "iw_samples": 5, "num_images": 50, "kl_per_group": [2.0]})
    )
    manifest = tmp_path / "data-manifest.json"
    manifest.write_text('{"dataset": "fashion-mnist"}')
    return {"onnx": onnx, "checkpoint": ckpt, "metrics": metrics, "data": manifest}


def publish(reg, a, *extra):
    return main(["model", "publish", "--registry", reg, "--onnx", str(a["onnx"]), "--checkpoint",
                 str(a["checkpoint"]), "--metrics", str(a["metrics"]), "--data-manifest", str(a["data"]),
                 *extra])  # fmt: skip


def test_publish_is_content_addressed_written_once_and_moves_latest(reg, artifacts, capsys):
    assert publish(reg, artifacts, "--run-id", "run-1") == 0
    first = Registry(reg).manifest()
    assert len(first["version"]) == 16 and "published; latest" in capsys.readouterr().out
    assert first["card"]["steps"] == 40 and first["card"]["nll_bpd"] == 3.25
    assert first["card"]["bn_readjust_temperature"] == 0.8 and first["card"]["run_id"] == "run-1"
    assert first["version"] == content_version({n: f["sha256"] for n, f in first["files"].items()})
    # The same files again: nothing rewritten, same version (and the manifest handed back on request).
    out = artifacts["onnx"].parent / "published.json"
    assert publish(reg, artifacts, "--manifest-out", str(out)) == 0
    assert json.loads(out.read_text()) == first
    assert "already published" in capsys.readouterr().out
    # Other weights: a new version, and latest follows; both are listed, oldest first.
    write_decoder(artifacts["onnx"], artifacts["checkpoint"], tag="other")
    assert publish(reg, artifacts) == 0
    second = Registry(reg).manifest()
    assert second["version"] != first["version"]
    assert [m["version"] for m in Registry(reg).list()] == [first["version"], second["version"]]
    assert main(["model", "list", "--registry", reg]) == 0
    out = capsys.readouterr().out
    assert f"{second['version']}" in out and "(latest)" in out and "NLL 3.2500 bpd" in out


def test_pull_verifies_every_file(reg, artifacts, tmp_path, capsys):
    assert publish(reg, artifacts) == 0
    version = Registry(reg).resolve()
    assert main(["model", "pull", "--registry", reg, "--out", str(tmp_path / "pulled")]) == 0
    pulled = tmp_path / "pulled"
    assert (pulled / "decoder.onnx").read_bytes() == artifacts["onnx"].read_bytes()
    assert sorted(p.name for p in pulled.iterdir()) == ["checkpoint.pt", "decoder.onnx", "manifest.json", "metrics.json"]
    # Into an existing folder (a mounted volume, in a container whose root is read-only): nothing is written
    # beside it, and nothing of the staging is left in it.
    volume = tmp_path / "mnt" / "models"
    volume.mkdir(parents=True)
    assert main(["model", "pull", "--registry", reg, "--out", str(volume)]) == 0
    assert [p.name for p in (tmp_path / "mnt").iterdir()] == ["models"]
    assert sorted(p.name for p in volume.iterdir()) == sorted(p.name for p in pulled.iterdir())
    assert json.loads((pulled / "manifest.json").read_text())["version"] == version
    assert main(["model", "pull", "--registry", reg, "--version", version, "--out", str(tmp_path / "v")]) == 0


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_unknown_versions_missing_files_and_tampered_objects_are_one_line_exit_2(
    reg, artifacts, tmp_path, capsys
):
    assert publish(reg, artifacts) == 0
    version = Registry(reg).resolve()
    capsys.readouterr()
    out = tmp_path / "pulled"
    assert main(["model", "pull", "--registry", reg, "--version", "0123456789abcdef", "--out", str(out)]) == 2
    err = _one_line(capsys)
    assert f"{reg}/0123456789abcdef/manifest.json: no such model version" in err and version in err
    assert main(["model", "show", "--registry", reg, "--version", "v1"]) == 2
    assert "is not a model version" in _one_line(capsys)
    client = s3_client_from_env()
    key = f"{reg.split('/', 3)[3]}/{version}/decoder.onnx"
    client.put_object(Bucket="nvae-registry", Key=key, Body=b"tampered")
    assert main(["model", "pull", "--registry", reg, "--out", str(out)]) == 2
    assert f"s3://nvae-registry/{key}: checksum mismatch" in _one_line(capsys)
    # nothing to serve, and nothing half-fetched: checkpoint.pt, fetched and verified before decoder.onnx
    # failed, is not in --out either, and no staging folder is left
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    out.mkdir()
    (out / "manifest.json").write_text("an older version's")
    assert main(["model", "pull", "--registry", reg, "--out", str(out)]) == 2
    assert "checksum mismatch" in _one_line(capsys)
    assert [p.name for p in out.iterdir()] == ["manifest.json"] and "older" in (out / "manifest.json").read_text()
    assert main(["model", "show", "--registry", reg]) == 2  # show reads the files too
    assert f"s3://nvae-registry/{key}: checksum mismatch" in _one_line(capsys)
    assert main(["model", "show", "--registry", reg, "--no-verify"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == version
    client.delete_object(Bucket="nvae-registry", Key=key)
    assert main(["model", "pull", "--registry", reg, "--out", str(out)]) == 2
    assert "listed in the manifest but missing" in _one_line(capsys)
    assert main(["model", "list", "--registry", "s3://nvae-registry/models/empty"]) == 0
    assert "no published versions" in capsys.readouterr().out
    assert main(["model", "pull", "--registry", "s3://nvae-registry/models/empty", "--out", str(out)]) == 2
    assert "nothing published yet" in _one_line(capsys)


def test_show_verifies_the_files_in_the_store(reg, artifacts, capsys):
    assert publish(reg, artifacts) == 0
    capsys.readouterr()
    assert main(["model", "show", "--registry", reg]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["files"]["checkpoint.pt"]["sha256"] == file_sha256(artifacts["checkpoint"])
    assert "verified: 3 files match" in err


def test_publish_refuses_a_decoder_exported_from_another_checkpoint(reg, artifacts, tmp_path, make_tiny, capsys):
    other = tmp_path / "other.pt"
    save_checkpoint(other, NVAE(make_tiny()), extra={"step": 41})
    write_decoder(artifacts["onnx"], other)  # exported from other.pt, published with checkpoint.pt
    capsys.readouterr()
    assert publish(reg, artifacts) == 2
    err = _one_line(capsys)
    assert "was exported from a checkpoint with sha256" in err and str(artifacts["checkpoint"]) in err
    write_decoder(artifacts["onnx"], other, record=False)
    assert publish(reg, artifacts) == 2
    assert "records no checkpoint it was exported from" in _one_line(capsys)
    artifacts["onnx"].write_bytes(b"not onnx" * 100)
    assert publish(reg, artifacts) == 2
    assert "not an ONNX model" in _one_line(capsys)
    with pytest.raises(Exception, match="nothing published yet"):
        Registry(reg).resolve()  # nothing was written


def test_an_interrupted_publish_is_never_listed(reg, artifacts):
    client = s3_client_from_env()
    client.put_object(
        Bucket="nvae-registry", Key=reg.split("/", 3)[3] + "/00000000deadbeef/decoder.onnx", Body=b"x"
    )
    assert Registry(reg).list() == []


def _store_manifest(reg, version, manifest) -> None:
    registry = Registry(reg)
    registry.client.put_object(Bucket=registry.bucket, Key=f"{registry.prefix}/{version}/manifest.json",
                               Body=json.dumps(manifest).encode())  # fmt: skip


@pytest.mark.parametrize(
    ("alter", "says"),
    [
        (lambda m: {**m, "files": {"../../escaped": m["files"]["decoder.onnx"]}},
         "files.../../escaped: expected a mapping of plain file names"),
        (lambda m: {**m, "files": {**m["files"], "decoder.onnx": {**m["files"]["decoder.onnx"], "size": "12"}}},
         'files.decoder.onnx.size: expected an integer >= 0, got "12"'),
        (lambda m: {**m, "files": {**m["files"], "decoder.onnx": {**m["files"]["decoder.onnx"], "sha256": "0" * 64}}},
         "the manifest was altered"),
        (lambda m: {**m, "version": True}, "version: expected 16 hex digits, got true"),
        (lambda m: [m], "manifest: expected a JSON object, got list"),
    ],
    ids=["file-outside", "size-string", "digest-changed", "version-bool", "not-an-object"],
)  # fmt: skip
def test_altered_manifest(reg, artifacts, tmp_path, capsys, alter, says):
    """A version's manifest of the wrong shape, or altered, is refused before any file is written: it is checked
    against the schema and against its folder and files' content version before pull, show or list trust it: a name that leaves --out, a string size, a changed digest."""
    assert publish(reg, artifacts) == 0
    version = Registry(reg).resolve()
    _store_manifest(reg, version, alter(Registry(reg).manifest()))
    capsys.readouterr()
    for argv in (["pull", "--out", str(tmp_path / "pulled")], ["show"], ["list"]):
        assert main(["model", *argv[:1], "--registry", reg, *argv[1:]]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{version}/manifest.json: " in err and says in err, err
    assert not (tmp_path / "pulled").exists() and not (tmp_path / "escaped").exists()


def test_a_latest_pointer_of_the_wrong_type_is_one_line(reg, artifacts, capsys):
    assert publish(reg, artifacts) == 0
    registry = Registry(reg)
    registry.client.put_object(Bucket=registry.bucket, Key=f"{registry.prefix}/latest", Body=b'{"version": 7}')
    capsys.readouterr()
    assert main(["model", "show", "--registry", reg]) == 2
    assert capsys.readouterr().err.strip().endswith("/latest: version: expected 16 hex digits, got 7")


def test_publish_refuses_metrics_of_the_wrong_types(reg, artifacts, capsys):
    artifacts["metrics"].write_text(json.dumps({**json.loads(artifacts["metrics"].read_text()), "nll_bpd": "3.2"}))
    assert publish(reg, artifacts) == 2
    assert capsys.readouterr().err.strip().endswith('metrics.json: nll_bpd: expected a finite number, got "3.2"')
