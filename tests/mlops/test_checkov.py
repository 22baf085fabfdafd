"""checkov's Kubernetes policies on every rendered kustomization: nothing fails but the findings docs/deploy.md
lists with their reasons ("Policy checks"), and every listed finding still fails (the list stays exact).

checkov lives in a virtual environment of its own (.venv-checkov, made by scripts/test.sh: its pins conflict
with the project's); without it the test is skipped."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from .conftest import REPO, run, tool

CHECKOV = REPO / ".venv-checkov" / "bin" / "checkov"
K8S = REPO / "k8s"
KUSTOMIZATIONS = ["base", *sorted(f"overlays/{p.name}" for p in (K8S / "overlays").iterdir()), "train"]


def _accepted() -> dict[str, tuple[set[str] | None, set[str]]]:
    """check id -> (overlays, or None for every overlay; workload names), from docs/deploy.md's table."""
    text = (REPO / "docs" / "deploy.md").read_text()
    section = text.split("## Policy checks (checkov)", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`CKV"):
            continue
        check = re.match(r"`(CKV_[A-Z0-9_]+)`", cells[0]).group(1)
        where = None if cells[1] == "every overlay" else set(re.findall(r"`([^`]+)`", cells[1]))
        rows[check] = (where, set(re.findall(r"`([^`]+)`", cells[2])))
    return rows


@pytest.fixture(scope="module")
def findings(tmp_path_factory) -> set[tuple[str, str, str]]:
    """(check id, kustomization, workload name) for every failed check."""
    if not CHECKOV.exists():
        pytest.skip(f"{CHECKOV} is missing (scripts/test.sh installs it)")
    out = tmp_path_factory.mktemp("rendered")
    for path in KUSTOMIZATIONS:
        rendered = run([tool("kubectl"), "kustomize", str(K8S / path)], cwd=REPO).stdout
        (out / (path.replace("/", "__") + ".yaml")).write_text(rendered)
    proc = subprocess.run(
        [str(CHECKOV), "-d", str(out), "--framework", "kubernetes", "--quiet", "--compact", "-o", "json"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # 1: some check failed
    reports = json.loads(proc.stdout)
    found = set()
    for report in reports if isinstance(reports, list) else [reports]:
        for check in report["results"]["failed_checks"]:
            kustomization = check["file_path"].strip("/").removesuffix(".yaml").replace("__", "/")
            found.add((check["check_id"], kustomization, check["resource"].rsplit(".", 1)[-1]))
    return found


def test_every_finding_is_listed_with_its_reason(findings):
    accepted = _accepted()
    assert accepted, "docs/deploy.md has no checkov table"
    unlisted = sorted(
        (check, where, name)
        for check, where, name in findings
        if check not in accepted
        or name not in accepted[check][1]
        or (accepted[check][0] is not None and where.split("/")[-1] not in accepted[check][0])
    )
    assert not unlisted, f"checkov findings not in docs/deploy.md's table: {unlisted}"


def test_every_listed_finding_still_fails(findings):
    for check, (where, names) in _accepted().items():
        for name in names:
            hits = {w for c, w, n in findings if c == check and n == name}
            assert hits, f"{check} on {name} passes now: take it out of docs/deploy.md's table"
            if where is not None:
                assert {w.split("/")[-1] for w in hits} == where, (check, name, hits)
