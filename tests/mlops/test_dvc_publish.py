"""dvc.yaml's publish stage: `dvc repro` publishes the model to the registry in the store, in the layout the
Kubeflow pipeline's register step writes, and with no registry configured publishes nothing and needs no store.

Real `dvc repro` and the real `nvae model publish` against the S3-API server on loopback; the stages before it
are the stand-in of fake_nvae.py, except that readjust_bn leaves a real (tiny) checkpoint, whose config the
model card reads."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import sys
from pathlib import Path

import pytest
import yaml

from cli.main import main
from common.registry import Registry
from common.s3 import s3_client_from_env
from model.checkpoint import save_checkpoint
from model.network import NVAE

from .conftest import CODE, git_repo, run, tool, tool_env

DVC_FILES = ["dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore", *CODE]
BUCKET = "nvae-dvc-publish"
PUBLISHED = "outputs/model/published.json"

# `nvae` for these tests: `model ...` is the real CLI, every other command the stand-in.
DISPATCH = """#!{python}
import os, shutil, sys
sys.path.insert(0, {here!r})
import fake_nvae

argv = sys.argv[1:]
if argv[0] == "model":
    with open(os.environ["FAKE_NVAE_LOG"], "a") as log:
        log.write(" ".join(argv) + "\\n")
    os.execv({real!r}, [{real!r}, *argv])
rc = fake_nvae.main(argv)
if argv[0] == "readjust-bn":
    shutil.copyfile({checkpoint!r}, fake_nvae.opt(argv, "--out"))
sys.exit(rc)
"""


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def publish_repo(tmp_path, s3_env, make_tiny, request):
    """(repo, env, log, registry): a git repo of the DVC files, `nvae` as above first on PATH, the store's
    endpoint and keys in env as AWS_*, and a registry URI of this test's own (not yet in params.yaml)."""
    repo = git_repo(tmp_path / "repo", DVC_FILES)
    checkpoint = tmp_path / "checkpoint_bn.pt"
    save_checkpoint(checkpoint, NVAE(make_tiny()), extra={"step": 100, "bn_readjust": {"temperature": 0.7}})
    bindir = tmp_path / "bin"
    bindir.mkdir()
    nvae = bindir / "nvae"
    nvae.write_text(
        DISPATCH.format(
            python=sys.executable,
            here=str(Path(__file__).parent),
            real=tool("nvae"),
            checkpoint=str(checkpoint),
        )
    )
    nvae.chmod(0o755)
    log = tmp_path / "calls.log"
    env = tool_env(
        FAKE_NVAE_LOG=str(log),
        AWS_ENDPOINT_URL=s3_env["endpoint_url"],
        AWS_ACCESS_KEY_ID=s3_env["access_key"],
        AWS_SECRET_ACCESS_KEY=s3_env["secret_key"],
        AWS_DEFAULT_REGION=s3_env["region"],
    )
    env["PATH"] = f"{bindir}:{env['PATH']}"
    s3_env["make_bucket"](BUCKET)
    registry = f"s3://{BUCKET}/models/{request.node.name.replace('_', '-')[:40]}"
    return repo, env, log, registry


def _repro(repo: Path, env: dict, log: Path, check: bool = True):
    """Run `dvc repro`; return (the nvae subcommands it called, in order; the CompletedProcess)."""
    log.write_text("")
    proc = run([tool("dvc"), "repro"], cwd=repo, env=env, check=check)
    return [line.split()[0] for line in log.read_text().splitlines()], proc


def _set_param(repo: Path, dotted: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    *parents, last = dotted.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _objects(registry: str) -> dict[str, tuple[str, str]]:
    """Every object under the registry: key -> (ETag, LastModified)."""
    bucket, prefix = registry[len("s3://") :].split("/", 1)
    page = s3_client_from_env().list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    return {
        o["Key"][len(prefix) + 1 :]: (o["ETag"], str(o["LastModified"])) for o in page.get("Contents", [])
    }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _status(repo: Path, env: dict) -> set[str]:
    return set(json.loads(run([tool("dvc"), "status", "--json"], cwd=repo, env=env).stdout or "{}"))


def test_publish_stage_reads_the_model_metrics_and_data_manifest(tmp_path):
    repo = git_repo(tmp_path, DVC_FILES)
    dot = run([tool("dvc"), "dag", "--dot"], cwd=repo).stdout
    into_publish = {a for a, b in re.findall(r'"?(\w+)"?\s*->\s*"?(\w+)"?', dot) if b == "publish"}
    assert into_publish == {"prepare", "evaluate", "readjust_bn", "export_onnx"}
    stage = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["publish"]
    assert stage["cmd"].startswith("nvae model publish ")
    assert stage["outs"] == [{PUBLISHED: {"cache": False}}]


def test_repro_publishes_a_version_with_the_commit_as_run_id_then_changes_nothing(
    publish_repo, tmp_path, capsys
):
    repo, env, log, registry = publish_repo
    _set_param(repo, "publish.registry", registry)
    calls, _ = _repro(repo, env, log)
    assert calls.count("model") == 1
    commit = run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo).stdout.strip()

    (manifest,) = Registry(registry).list()
    version = manifest["version"]
    assert manifest["card"]["run_id"] == f"dvc-{commit}"
    assert manifest["card"]["data_manifest_sha256"] == _sha256(repo / "outputs/data/manifest.json")
    assert json.loads((repo / PUBLISHED).read_text()) == manifest  # what dvc.lock records, in git
    # The register step's layout: <version>/ with the files and manifest.json, and the `latest` pointer.
    assert set(_objects(registry)) == {
        f"{version}/{name}" for name in ("decoder.onnx", "checkpoint.pt", "metrics.json", "manifest.json")
    } | {"latest"}
    local = {"decoder.onnx": "outputs/model/decoder.onnx", "checkpoint.pt": "outputs/model/checkpoint_bn.pt",
             "metrics.json": "outputs/eval/metrics.json"}  # fmt: skip
    assert {n: f["sha256"] for n, f in manifest["files"].items()} == {
        n: _sha256(repo / p) for n, p in local.items()
    }
    # What the sampler's init container runs finds it as `latest`.
    assert main(["model", "list", "--registry", registry]) == 0
    assert f"{version} " in capsys.readouterr().out
    assert main(["model", "pull", "--registry", registry, "--out", str(tmp_path / "pulled")]) == 0
    assert (tmp_path / "pulled/decoder.onnx").read_bytes() == (repo / local["decoder.onnx"]).read_bytes()

    before = (_objects(registry), (repo / PUBLISHED).read_text(), (repo / "dvc.lock").read_text())
    calls, proc = _repro(repo, env, log)
    assert calls == [] and "Running stage" not in proc.stdout
    assert (_objects(registry), (repo / PUBLISHED).read_text(), (repo / "dvc.lock").read_text()) == before
    assert _status(repo, env) == set()


def test_a_changed_model_is_published_as_a_new_version_and_becomes_latest(publish_repo):
    repo, env, log, registry = publish_repo
    _set_param(repo, "publish.registry", registry)
    _repro(repo, env, log)
    first = json.loads((repo / PUBLISHED).read_text())["version"]
    _set_param(repo, "evaluate.iw_samples", 8)  # new metrics.json: other files, so another version
    calls, _ = _repro(repo, env, log)
    assert calls == ["evaluate", "model"]
    second = json.loads((repo / PUBLISHED).read_text())["version"]
    assert second != first
    assert [m["version"] for m in Registry(registry).list()] == [first, second]
    assert Registry(registry).resolve() == second


def test_without_a_registry_nothing_is_published_and_no_store_is_needed(publish_repo):
    repo, env, log, registry = publish_repo
    env["AWS_ENDPOINT_URL"] = _closed_port_url()  # any request to a store would fail
    calls, _ = _repro(repo, env, log)
    assert calls[-1] == "model" and calls.count("model") == 1
    assert json.loads((repo / PUBLISHED).read_text())["published"] is False
    assert _objects(registry) == {}
    calls, _ = _repro(repo, env, log)
    assert calls == []


def test_a_record_is_never_restored_from_the_run_cache_without_publishing(publish_repo):
    """Back to a registry published before, on a store that lost it (another store at the same URI): DVC's run
    cache could restore published.json from the first run; the stage must run and publish again."""
    repo, env, log, registry = publish_repo
    _set_param(repo, "publish.registry", registry)
    _repro(repo, env, log)
    _set_param(repo, "publish.registry", "")
    _repro(repo, env, log)
    bucket, prefix = registry[len("s3://") :].split("/", 1)
    for key in _objects(registry):
        s3_client_from_env().delete_object(Bucket=bucket, Key=f"{prefix}/{key}")
    _set_param(repo, "publish.registry", registry)
    calls, _ = _repro(repo, env, log)
    assert calls == ["model"]
    assert json.loads((repo / PUBLISHED).read_text())["version"] == Registry(registry).resolve()


def test_an_unreachable_store_fails_the_stage_and_the_next_repro_publishes(publish_repo):
    repo, env, log, registry = publish_repo
    _set_param(repo, "publish.registry", registry)
    endpoint = env["AWS_ENDPOINT_URL"]
    env["AWS_ENDPOINT_URL"] = _closed_port_url()
    calls, proc = _repro(repo, env, log, check=False)
    assert proc.returncode != 0 and calls[-1] == "model"
    assert "exited with 75" in proc.stdout + proc.stderr  # nvae's "retry later" status, as DVC reports it
    assert _status(repo, env) == {"publish"}  # not recorded in dvc.lock: the next repro publishes
    env["AWS_ENDPOINT_URL"] = endpoint
    calls, _ = _repro(repo, env, log)
    assert calls == ["model"]
    assert json.loads((repo / PUBLISHED).read_text())["version"] == Registry(registry).resolve()
