"""The layers of the house: a lower package never imports a higher one (every import, lazy ones included,
read with `ast`)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each top-level package may import of the project (itself always allowed).
ALLOWED = {
    "common": set(),
    "model": {"common"},
    "data": {"common"},
    "serving": {"common.errors", "common.argtypes", "common.files", "common.cpu"},
    "training": {"common", "model", "data"},
    "inference": {"common", "model", "data"},
    "cli": {"common", "model", "data", "training", "inference", "serving", "components", "pipelines"},
    # The steps run the `nvae` command as a process (as dvc.yaml's stages do): components never import cli.
    "components": {"common", "model", "data", "training", "inference", "serving"},
    "pipelines": {"common", "model", "data", "training", "inference", "serving", "components"},
    "bench": {
        "common",
        "model",
        "data",
        "training",
        "inference",
        "serving",
        "cli",
        "components",
        "pipelines",
    },
}
PROJECT = set(ALLOWED)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) for every absolute import in a Python file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def permitted(module: str, allowed: set[str]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


def violations(root: Path) -> list[str]:
    """Every import under `root` that crosses the layering, as 'file:line imports module'."""
    out = []
    for package, allowed in ALLOWED.items():
        for path in sorted((root / package).rglob("*.py")):
            for line, module in imported_modules(path):
                top = module.split(".")[0]
                if top in PROJECT and top != package and not permitted(module, allowed):
                    out.append(f"{path.relative_to(root)}:{line} imports {module}")
    return out


def test_every_layer_imports_only_what_lies_below_it():
    assert violations(ROOT) == []


def package_graph(root: Path) -> dict[str, set[str]]:
    """Which top-level packages each package imports (any import, lazy ones included)."""
    graph: dict[str, set[str]] = {p: set() for p in PROJECT}
    for package in PROJECT:
        for path in sorted((root / package).rglob("*.py")):
            for _, module in imported_modules(path):
                top = module.split(".")[0]
                if top in PROJECT and top != package:
                    graph[package].add(top)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle of package imports, each as the packages along it (a -> b -> ... -> a), found by DFS."""
    found, seen = [], set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycle = path[path.index(nxt) :] + [nxt]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    found.append(cycle)
            else:
                visit(nxt, [*path, nxt])

    for start in sorted(graph):
        visit(start, [start])
    return found


def test_no_two_packages_import_each_other_even_through_others():
    assert cycles(package_graph(ROOT)) == []


def test_a_cycle_through_three_packages_is_reported(tmp_path):
    for package, source in {
        "cli": "from pipelines.nvae_pipeline import compile_pipeline\n",
        "pipelines": "from components.steps import build\n",
        "components": "def run():\n    from cli.main import main\n",
    }.items():
        (tmp_path / package).mkdir()
        (tmp_path / package / "mod.py").write_text(source)
    found = cycles(package_graph(tmp_path))
    assert len(found) == 1 and set(found[0]) == {"cli", "pipelines", "components"}


def test_every_package_is_under_the_rule():
    """A new top-level package must be placed in ALLOWED before it can import or be imported."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages - PROJECT == set()


@pytest.mark.parametrize(
    ("package", "source", "bad"),
    [
        ("model", "from data.loaders import make_loader\n", "data.loaders"),
        ("data", "def f():\n    import model.network\n", "model.network"),
        ("training", "from inference.sample import reconstructions\n", "inference.sample"),
        ("inference", "from training import train\n", "training.train"),
        ("serving", "from model.prior_sampling import draw_noise\n", "model.prior_sampling"),
        ("serving", "from common.s3 import parse_s3_uri\n", "common.s3"),
        ("components", "from pipelines.nvae_pipeline import compile_pipeline\n", "pipelines.nvae_pipeline"),
        ("common", "from model.config import NVAEConfig\n", "model.config"),
        ("inference", "from cli.main import main\n", "cli.main"),
        ("components", "def run():\n    from cli.main import main\n", "cli.main"),
    ],
)
def test_a_violation_is_reported(tmp_path, package, source, bad):
    (tmp_path / package).mkdir()
    (tmp_path / package / "mod.py").write_text(source)
    found = violations(tmp_path)
    assert len(found) == 1 and f"imports {bad}" in found[0]
