"""dvc.yaml + params.yaml: the DAG, parameters, and the repro semantics (`dvc repro` runs everything once, a
second run does nothing, a parameter change re-runs only the stages that depend on it).

The fast tests run real `dvc repro` in a throwaway git repository with a stand-in `nvae` on PATH (fake_nvae.py),
so they check DVC's wiring in seconds; the slow test runs the real CLI on a fresh copy of the repository."""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import CODE, REPO, git_repo, run, tool, tool_env

STAGES = ["prepare", "train", "evaluate", "readjust_bn", "export_onnx", "sample", "fid", "publish"]
EDGES = {
    ("prepare", "train"),
    ("prepare", "evaluate"),
    ("train", "evaluate"),
    ("train", "readjust_bn"),
    ("readjust_bn", "export_onnx"),
    ("export_onnx", "sample"),
    ("prepare", "fid"),
    ("export_onnx", "fid"),
    ("prepare", "publish"),
    ("evaluate", "publish"),
    ("readjust_bn", "publish"),
    ("export_onnx", "publish"),
}
DVC_FILES = ["dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".dvcignore", *CODE]


def _dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def _params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def _lookup(params: dict, dotted: str):
    node = params
    for part in dotted.split("."):
        node = node[part]
    return node


# --- structure, read from the files and from dvc itself ------------------------------------------------------


def test_stages_in_order_each_calling_the_nvae_cli():
    stages = _dvc_yaml()["stages"]
    assert list(stages) == STAGES
    for name, stage in stages.items():
        assert stage["cmd"].startswith("nvae "), name


def test_dag_edges_as_dvc_sees_them(tmp_path):
    repo = git_repo(tmp_path, DVC_FILES)
    dot = run([tool("dvc"), "dag", "--dot"], cwd=repo).stdout
    edges = {tuple(e) for e in re.findall(r'"?(\w+)"?\s*->\s*"?(\w+)"?', dot)}
    assert edges == EDGES


def test_every_interpolated_parameter_exists_and_is_declared_by_its_stage():
    params, stages = _params(), _dvc_yaml()["stages"]
    for name, stage in stages.items():
        declared = [p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])]
        text = yaml.safe_dump(stage)
        for ref in re.findall(r"\$\{([\w.]+)\}", text):
            _lookup(params, ref)  # KeyError names a parameter missing from params.yaml
            if ref.startswith("prepare.source"):
                continue  # also a file dependency
            assert any(ref == d or ref.startswith(d + ".") for d in declared), (
                f"{name} reads {ref} undeclared"
            )


def test_every_parameter_is_read_by_some_stage():
    text = (REPO / "dvc.yaml").read_text()
    refs = set(re.findall(r"\$\{([\w.]+)\}", text))

    def leaves(node, prefix=""):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict) and path != "train.overrides":
                yield from leaves(value, path + ".")
            else:
                yield path

    unused = [p for p in leaves(_params()) if not any(p == r or p.startswith(r + ".") for r in refs)]
    assert not unused, f"params.yaml keys no stage reads: {unused}"


def test_defaults_are_the_embedded_default_and_small():
    p = _params()
    assert (p["prepare"]["dataset"], p["train"]["preset"]) == ("fashion-mnist", "fmnist-cpu")
    assert p["train"]["steps"] <= 200 and p["evaluate"]["iw_samples"] <= 16 and p["evaluate"]["limit"] <= 256


def test_metrics_and_plots_are_declared():
    dvc = _dvc_yaml()
    (metric,) = dvc["stages"]["evaluate"]["metrics"]
    assert "outputs/eval/metrics.json" in metric and metric["outputs/eval/metrics.json"]["cache"] is False
    assert any("kl_per_group.png" in next(iter(p)) for p in dvc["stages"]["evaluate"]["plots"])
    assert any("dvclive/plots" in next(iter(p)) for p in dvc["plots"])


# --- repro semantics with the stand-in CLI -------------------------------------------------------------------


@pytest.fixture
def fake_repo(tmp_path):
    """A git repo with dvc.yaml/params.yaml/.dvc and a stand-in `nvae` first on PATH; yields (repo, env, log)."""
    (tmp_path / "repo").mkdir()
    repo = git_repo(tmp_path / "repo", DVC_FILES)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "nvae"
    fake.write_text(f"#!{sys.executable}\n" + (Path(__file__).parent / "fake_nvae.py").read_text())
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    env = tool_env(FAKE_NVAE_LOG=str(log))
    env["PATH"] = f"{bindir}:{env['PATH']}"
    return repo, env, log


def _repro(repo: Path, env: dict, log: Path) -> list[str]:
    """Run `dvc repro`; return the nvae subcommands it called, in order."""
    log.write_text("")
    run([tool("dvc"), "repro"], cwd=repo, env=env)
    return [line.split()[0] for line in log.read_text().splitlines()]


def _set_param(repo: Path, dotted: str, value) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    *parents, last = dotted.split(".")
    _lookup(params, ".".join(parents))[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _status_stages(repo: Path, env: dict) -> set[str]:
    out = run([tool("dvc"), "status", "--json"], cwd=repo, env=env).stdout
    import json

    return set(json.loads(out or "{}"))


def test_repro_runs_every_stage_once_then_nothing(fake_repo):
    repo, env, log = fake_repo
    assert _repro(repo, env, log) == "prepare train evaluate readjust-bn export-onnx sample fid model".split()
    assert _repro(repo, env, log) == []
    assert _status_stages(repo, env) == set()


def test_fid_is_off_by_default_then_runs_on_the_decoder_and_reports_a_metric(fake_repo):
    repo, env, log = fake_repo
    _repro(repo, env, log)
    (call,) = [line for line in log.read_text().splitlines() if line.startswith("fid ")]
    assert "--onnx outputs/model/decoder.onnx --data outputs/data" in call and "--n 0" in call
    _set_param(repo, "fid.inception", "/models/pt_inception-2015-12-05-6726825d.pth")
    _set_param(repo, "fid.n", 500)
    assert _repro(repo, env, log) == ["fid"]
    (call,) = [line for line in log.read_text().splitlines() if line.startswith("fid ")]
    assert "--inception /models/pt_inception-2015-12-05-6726825d.pth --n 500 --temperature 0.7" in call
    shown = run([tool("dvc"), "metrics", "show", "--json"], cwd=repo, env=env).stdout
    assert '"fid"' in shown and "outputs/eval/fid.json" in shown
    assert _repro(repo, env, log) == []
    _set_param(repo, "sample.temperature", 0.9)  # a new decoder: new samples, a new FID
    assert _repro(repo, env, log) == ["readjust-bn", "export-onnx", "sample", "fid", "model"]


# (parameter, new value, stages `dvc status` reports, nvae commands `dvc repro` then runs), applied in turn;
# "model" is the publish stage (`nvae model publish`), downstream of every new model or metrics.
CHANGES = [
    ("evaluate.iw_samples", 8, {"evaluate"}, ["evaluate", "model"]),
    ("sample.n", 4, {"sample"}, ["sample"]),
    (
        "sample.temperature",
        0.9,
        {"readjust_bn", "sample", "fid"},
        ["readjust-bn", "export-onnx", "sample", "fid", "model"],
    ),
    (
        "train.steps",
        7,
        {"train"},
        ["train", "evaluate", "readjust-bn", "export-onnx", "sample", "fid", "model"],
    ),
]


def test_changing_one_parameter_reruns_only_its_dependents(fake_repo):
    repo, env, log = fake_repo
    _repro(repo, env, log)
    for param, value, status, reruns in CHANGES:
        _set_param(repo, param, value)
        # `dvc status` names the stages whose own parameters changed, before anything runs ...
        assert _status_stages(repo, env) == status, param
        # ... and `dvc repro` runs those plus the stages downstream of changed outputs, nothing else.
        assert _repro(repo, env, log) == reruns, param
    assert _repro(repo, env, log) == []


def test_overrides_reach_train_as_repeated_set_flags(fake_repo):
    repo, env, log = fake_repo
    _set_param(repo, "train.overrides.set", ["channels=8", "kl_anneal_portion=0.5"])
    _repro(repo, env, log)
    (train,) = [line for line in log.read_text().splitlines() if line.startswith("train ")]
    assert train.endswith("--set channels=8 --set kl_anneal_portion=0.5")


# --- the real thing ------------------------------------------------------------------------------------------


def _has_all_commands() -> bool:
    help_text = subprocess.run(
        [tool("nvae"), "--help"], capture_output=True, text=True, env=tool_env()
    ).stdout
    return all(
        c in help_text for c in ("prepare", "train", "evaluate", "readjust-bn", "export-onnx", "sample")
    )


@pytest.mark.slow
def test_repro_on_a_fresh_clone_runs_the_embedded_default(tmp_path):
    """Real `nvae` on a fresh copy of the repository (~3 min on an idle 2-core CPU; ~15 min when shared)."""
    if not _has_all_commands():
        pytest.skip("the nvae CLI lacks some of the pipeline's commands")
    if not Path(_params()["prepare"]["source"]).is_dir():
        pytest.skip("the embedded Fashion-MNIST is not installed")
    listed = run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO).stdout.split()
    files = [f for f in listed if (REPO / f).is_file() and not f.startswith(("outputs/", "runs/"))]
    repo = git_repo(tmp_path, files)
    env = tool_env()
    run([tool("dvc"), "repro"], cwd=repo, env=env, timeout=3600)
    for out in [
        "outputs/data/manifest.json",
        "outputs/train/checkpoint.pt",
        "outputs/model/checkpoint_bn.pt",
        "outputs/model/decoder.onnx",
        "outputs/eval/metrics.json",
        "outputs/eval/kl_per_group.png",
    ]:
        assert (repo / out).is_file(), out
    assert list((repo / "outputs/samples").glob("grid_t*.png"))
    shown = run([tool("dvc"), "metrics", "show", "--json"], cwd=repo, env=env).stdout
    assert "nll_bpd" in shown
    assert "Running stage" not in run([tool("dvc"), "repro"], cwd=repo, env=env).stdout
    _set_param(repo, "evaluate.limit", 16)
    out = run([tool("dvc"), "repro"], cwd=repo, env=env, timeout=1800).stdout
    assert re.findall(r"Running stage '(\w+)'", out) == ["evaluate", "publish"]


def test_init_from_reaches_train_and_reruns_it_and_its_dependents(fake_repo):
    repo, env, log = fake_repo
    _repro(repo, env, log)
    (train,) = [line for line in log.read_text().splitlines() if line.startswith("train ")]
    assert "--init-from  --data" in train  # "" by default: a fresh network
    _set_param(repo, "train.init_from", "/models/nvlabs/ffhq/checkpoint.pt")
    ran = _repro(repo, env, log)
    assert (
        ran[0] == "train" and "prepare" not in ran and {"evaluate", "readjust-bn", "export-onnx"} <= set(ran)
    )
    (train,) = [line for line in log.read_text().splitlines() if line.startswith("train ")]
    assert "--init-from /models/nvlabs/ffhq/checkpoint.pt --data outputs/data" in train


def test_repro_from_an_authors_checkpoint_trains_nothing_and_runs_the_rest(tmp_path):
    """Real `nvae` (about 35 s): the params switch (train.init_from, steps 0) takes the committed authors' file through
    evaluation, BN readjustment, export and sampling."""
    if not Path(_params()["prepare"]["source"]).is_dir():
        pytest.skip("the embedded Fashion-MNIST is not installed")
    listed = run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO).stdout.split()
    files = [f for f in listed if (REPO / f).is_file() and not f.startswith(("outputs/", "runs/"))]
    repo = git_repo(tmp_path, files)
    authors = REPO / "tests" / "model" / "nvlabs" / "tiny-mnist.pt"
    for dotted, value in [
        ("prepare.dataset", "mnist"), ("train.init_from", str(authors)), ("train.steps", 0),
        ("train.batch_size", 16), ("evaluate.limit", 8), ("evaluate.iw_samples", 2), ("readjust_bn.iters", 2),
        ("sample.n", 4),
    ]:  # fmt: skip
        _set_param(repo, dotted, value)
    env = tool_env()
    run([tool("dvc"), "repro"], cwd=repo, env=env, timeout=3600)
    summary = json.loads((repo / "outputs/train/train_summary.json").read_text())
    assert summary["steps"] == 0 and (repo / "outputs/train/train_metrics.jsonl").read_text() == ""
    metrics = json.loads((repo / "outputs/eval/metrics.json").read_text())
    assert metrics["dataset"] == "mnist" and metrics["num_images"] == 8
    assert (repo / "outputs/model/decoder.onnx").stat().st_size > 0
    assert list((repo / "outputs/samples").glob("grid_t*.png"))
