"""dvc.yaml follows the code and speaks DVC's own language: each stage depends on the code its command runs
(derived here from the imports, not listed by hand), DVCLive's training metrics are experiment metrics
(`dvc exp show`), and the models are DVC artifacts (`dvc artifacts get`). The repro tests run the real DVC with
the stand-in `nvae` of test_dvc.py on a copy of the code."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO
from .test_dvc import (
    _repro,
    _set_param,
    _status_stages,
    fake_repo,  # noqa: F401  (the fixture)
)

PACKAGES = {"cli", "common", "model", "data", "training", "inference", "serving", "components", "pipelines"}


def _module_file(module: str) -> Path | None:
    base = REPO / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(node: ast.AST) -> set[str]:
    """The project's modules imported anywhere under `node` (lazy imports inside functions included)."""
    found = set()
    for item in ast.walk(node):
        if isinstance(item, ast.Import):
            found |= {alias.name for alias in item.names}
        elif isinstance(item, ast.ImportFrom) and item.level == 0 and item.module:
            found.add(item.module)
            found |= {f"{item.module}.{alias.name}" for alias in item.names}  # `from pkg import module`
    return {m for m in found if m.split(".")[0] in PACKAGES and _module_file(m)}


def _closure(modules: set[str]) -> set[str]:
    """`modules`, their packages' __init__ modules, and everything they import, transitively."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += _imports(ast.parse(_module_file(module).read_text()))
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
    return seen


def _handler(words: list[str]):
    """The function `nvae WORDS...` runs, from the parser (behind a functools.wraps wrapper such as
    cli.store's retry exit)."""
    from cli.main import build_parser

    parser = build_parser()
    for word in words:
        (sub,) = [a for a in parser._actions if isinstance(getattr(a, "choices", None), dict)]
        parser = sub.choices[word]
    func = parser.get_default("func")
    func = getattr(func, "__wrapped__", func)  # functools.wraps
    return func


def code_deps(words: list[str]) -> set[str]:
    """What `nvae WORDS...` runs: cli/main.py, the command's module, the cli modules it reaches, and each
    library package it imports. The command's own module counts only its top-level imports and those of the
    functions its handler reaches, not the other commands' lazy ones."""
    func = _handler(words)
    module = sys.modules[func.__module__]
    tree = ast.parse(Path(module.__file__).read_text())
    reached = set()
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            reached |= _imports(node)
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    todo, done = [func.__name__], set()
    while todo:
        name = todo.pop()
        if name in done or name not in functions:
            continue
        done.add(name)
        reached |= _imports(functions[name])
        todo += [n.id for n in ast.walk(functions[name]) if isinstance(n, ast.Name)]
    modules = _closure(reached)
    deps = {"cli/main.py", str(Path(module.__file__).relative_to(REPO))}
    deps |= {str(_module_file(m).relative_to(REPO)) for m in modules if m.startswith("cli.")}
    deps |= {m.split(".")[0] for m in modules if not m.startswith("cli")}
    return deps


def _stage_command(cmd: str) -> list[str]:
    words = cmd.split()[1:]
    return words[:2] if words[0] == "model" else words[:1]


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_depends_on_the_code_its_command_runs(stage):
    spec = STAGES[stage]
    listed = {d for d in spec["deps"] if d.split("/")[0] in PACKAGES}
    assert listed == code_deps(_stage_command(spec["cmd"])), stage


def test_the_derivation_sees_lazy_imports_and_stops_at_other_commands():
    # train imports training only inside cmd_train; sample reaches serving (the ONNX sampler) but not training
    assert {"training", "model", "data"} <= code_deps(["train"])
    assert "serving" in code_deps(["sample"]) and "training" not in code_deps(["sample"])
    assert code_deps(["prepare"]) == {"cli/main.py", "cli/data.py", "common", "data"}


def test_a_change_in_the_network_makes_the_stages_that_run_it_stale(fake_repo):  # noqa: F811
    repo, env, log = fake_repo
    _repro(repo, env, log)
    (repo / "model" / "__pycache__").mkdir(exist_ok=True)
    (repo / "model" / "__pycache__" / "network.cpython-311.pyc").write_bytes(b"bytecode")
    assert _status_stages(repo, env) == set()  # bytecode is not code (.dvcignore)
    with (repo / "model" / "network.py").open("a") as fh:
        fh.write("\n# a change in the network\n")
    assert _status_stages(repo, env) == {
        "train",
        "evaluate",
        "readjust_bn",
        "export_onnx",
        "sample",
        "fid",
        "publish",
    }
    assert _repro(repo, env, log) == "train evaluate readjust-bn export-onnx sample fid model".split()
    with (repo / "data" / "loaders.py").open("a") as fh:
        fh.write("\n# a change in a loader\n")
    assert "prepare" in _status_stages(repo, env) and "readjust_bn" not in _status_stages(repo, env)


def test_exp_run_and_exp_show_list_the_training_metrics(fake_repo):  # noqa: F811
    from .conftest import run, tool

    repo, env, log = fake_repo
    log.write_text("")
    run([tool("dvc"), "exp", "run", "--name", "base"], cwd=repo, env=env)
    run([tool("dvc"), "exp", "run", "--name", "longer", "--set-param", "train.steps=7"], cwd=repo, env=env)
    shown = json.loads(run([tool("dvc"), "exp", "show", "--json"], cwd=repo, env=env).stdout)
    experiments = {
        exp["name"]: exp["revs"][0]["data"]
        for commit in shown
        for exp in commit.get("experiments") or []
        if exp.get("name")
    }
    assert set(experiments) == {"base", "longer"}
    for data in experiments.values():
        train_metrics = data["metrics"]["outputs/train/dvclive/metrics.json"]["data"]
        assert {"loss", "nelbo_bpd", "kl"} <= set(train_metrics["train"])
        assert "nll_bpd" in data["metrics"]["outputs/eval/metrics.json"]["data"]
    assert experiments["longer"]["params"]["params.yaml"]["data"]["train"]["steps"] == 7
    losses = {
        name: d["metrics"]["outputs/train/dvclive/metrics.json"]["data"]["train"]["loss"]
        for name, d in experiments.items()
    }
    assert losses["base"] != losses["longer"]  # each experiment's own training run


def test_the_models_are_dvc_artifacts_that_artifacts_get_fetches(fake_repo, tmp_path):  # noqa: F811
    from .conftest import run, tool

    artifacts = yaml.safe_load((REPO / "dvc.yaml").read_text())["artifacts"]
    assert {a["path"] for a in artifacts.values()} == {
        "outputs/model/decoder.onnx",
        "outputs/model/checkpoint_bn.pt",
    }
    assert all(a["type"] == "model" and a["desc"] and a["labels"] for a in artifacts.values())

    repo, env, log = fake_repo
    _set_param(repo, "train.steps", 3)
    _repro(repo, env, log)
    remote = tmp_path / "remote"
    run([tool("dvc"), "remote", "add", "-f", "-d", "store", str(remote)], cwd=repo, env=env)
    run([tool("dvc"), "push"], cwd=repo, env=env)
    run(["git", "add", "-A"], cwd=repo, env=env)
    run(["git", "commit", "-qm", "a model"], cwd=repo, env=env)
    listed = run([tool("dvc"), "ls", str(repo), "outputs/model"], cwd=tmp_path, env=env).stdout
    assert "decoder.onnx" in listed
    # a version, registered as GTO (and DVC Studio's model registry) writes it: an annotated tag NAME@vX.Y.Z
    tag = [
        "git",
        "tag",
        "-a",
        "nvae-decoder@v0.1.0",
        "-m",
        "Registering artifact nvae-decoder version v0.1.0",
    ]
    run(tag, cwd=repo, env=env)
    out = tmp_path / "got" / "decoder.onnx"
    get = [tool("dvc"), "artifacts", "get", str(repo), "nvae-decoder", "--rev", "v0.1.0", "-o", str(out)]
    run(get, cwd=tmp_path, env=env)
    assert out.read_bytes() == (repo / "outputs" / "model" / "decoder.onnx").read_bytes()


def test_dvclive_writes_its_summary_and_curves_where_dvc_yaml_reads_them(tmp_path):
    """The real DVCLive, through the training loop's logger: the paths dvc.yaml declares exist after a run."""
    pytest.importorskip("dvclive")
    from training.metrics import RunLogger

    train = STAGES["train"]
    run_dir = tmp_path / "outputs" / "train"
    run_dir.mkdir(parents=True)
    logger = RunLogger(run_dir, enabled=True, resume=False)
    for step in (1, 2):
        logger.log_step(step, {"loss": 10.0 / step, "nelbo_bpd": 4.0, "kl": 3.0})
    logger.log_interval(2, {"active_fraction": 0.5}, None)
    logger.close()
    (metric,) = [next(iter(m)) for m in train["metrics"]]
    (plots,) = [next(iter(p)) for p in train["plots"]]
    summary = json.loads((tmp_path / metric).read_text())
    assert summary["train"]["loss"] == 5.0 and summary["eval"]["active_fraction"] == 0.5
    assert (tmp_path / plots / "metrics" / "train" / "loss.tsv").is_file()
