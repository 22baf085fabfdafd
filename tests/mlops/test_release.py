"""A release (.github/workflows/release.yml): a v* tag builds and pushes the four images, and scripts/release.sh
compiles the pipeline spec against the digests they were pushed with, for the release's assets."""

from __future__ import annotations

import hashlib
import shutil
import sys

import pytest
import yaml

from cli.main import main
from common.errors import ConfigError
from components.images import Images

from .conftest import BIN, REPO, run, tool_env

WORKFLOW = REPO / ".github" / "workflows" / "release.yml"
KINDS = ("cpu", "gpu", "serve-cpu", "serve-gpu")


def _digest(kind: str) -> str:
    return "sha256:" + hashlib.sha256(kind.encode()).hexdigest()


def _steps(job: dict) -> list[dict]:
    return job["steps"]


def test_the_workflow_passes_actionlint():
    exe = BIN / "actionlint" if (BIN / "actionlint").exists() else shutil.which("actionlint")
    if exe is None:
        pytest.skip("actionlint is not installed (the dev extra has it)")
    run([str(exe), "-no-color", str(WORKFLOW.relative_to(REPO))], cwd=REPO)


def test_a_version_tag_builds_and_pushes_every_image_from_its_dockerfile():
    doc = yaml.safe_load(WORKFLOW.read_text())
    on = doc[True]  # YAML 1.1 reads the key `on` as true
    assert on == {"push": {"tags": ["v*"]}}
    images = doc["jobs"]["images"]
    assert images["permissions"]["packages"] == "write"
    assert images["strategy"]["matrix"]["kind"] == list(KINDS)
    for kind in KINDS:
        assert (REPO / "k8s" / "images" / f"{kind}.Dockerfile").exists()
    (build,) = [s for s in _steps(images) if s.get("uses", "").startswith("docker/build-push-action@")]
    assert (
        build["with"]["file"] == "k8s/images/${{ matrix.kind }}.Dockerfile" and build["with"]["push"] is True
    )
    assert build["with"]["tags"].endswith("/nvae-${{ matrix.kind }}:${{ steps.names.outputs.tag }}")
    names = next(s for s in _steps(images) if s.get("id") == "names")["run"]
    assert "ghcr.io/${GITHUB_REPOSITORY_OWNER,,}" in names  # registry paths are lower case
    record = next(s for s in _steps(images) if s.get("name") == "Record the digest")
    assert record["env"]["DIGEST"] == "${{ steps.build.outputs.digest }}"


def test_the_release_job_compiles_against_the_digests_and_attaches_the_spec():
    release = yaml.safe_load(WORKFLOW.read_text())["jobs"]["release"]
    assert release["needs"] == "images" and release["permissions"]["contents"] == "write"
    script = "\n".join(s.get("run", "") for s in _steps(release))
    assert "bash scripts/release.sh" in script and "--digests digests --out dist" in script
    assert (
        "gh release upload" in script and "dist/nvae_pipeline.yaml" in script and "dist/images.yaml" in script
    )
    download = next(s for s in _steps(release) if s.get("uses", "").startswith("actions/download-artifact@"))
    assert download["with"]["pattern"] == "digest-*" and download["with"]["path"] == "digests"


def _release(tmp_path, digests: dict[str, str], **env):
    folder = tmp_path / "digests"
    folder.mkdir(exist_ok=True)
    for kind, digest in digests.items():
        (folder / kind).write_text(digest + "\n")
    nvae = BIN / "nvae" if (BIN / "nvae").exists() else None
    env = {"NVAE": str(nvae) if nvae else f"{sys.executable} -m cli.main", **env}
    environment = tool_env(**env)
    argv = ["bash", "scripts/release.sh", "--registry", "ghcr.io/example-org", "--tag", "0.1.0"]
    return run(
        [*argv, "--digests", str(folder), "--out", str(tmp_path / "dist")], REPO, environment, check=False
    )


def test_release_sh_compiles_the_spec_against_the_pushed_digests(tmp_path):
    digests = {kind: _digest(kind) for kind in KINDS}
    proc = _release(tmp_path, digests)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    spec = next(yaml.safe_load_all((tmp_path / "dist" / "nvae_pipeline.yaml").read_text()))
    concrete = {
        ex["container"]["image"]
        for ex in spec["deploymentSpec"]["executors"].values()
        if not ex["container"]["image"].startswith("{{")  # chosen at run time from validate-params' plan
    }
    cpu = f"ghcr.io/example-org/nvae-cpu:0.1.0@{digests['cpu']}"
    gpu = f"ghcr.io/example-org/nvae-gpu:0.1.0@{digests['gpu']}"
    assert concrete == {cpu, gpu}
    constants = spec["root"]["dag"]["tasks"]["validate-params"]["inputs"]["parameters"]
    assert constants["cpu_image"]["runtimeValue"]["constant"] == cpu
    assert constants["gpu_image"]["runtimeValue"]["constant"] == gpu
    listed = yaml.safe_load((tmp_path / "dist" / "images.yaml").read_text())
    assert listed == {k: f"ghcr.io/example-org/nvae-{k}:0.1.0@{digests[k]}" for k in KINDS}
    assert set(listed) == set(yaml.safe_load((REPO / "k8s" / "images.yaml").read_text()))


@pytest.mark.parametrize(
    "digests, message",
    [
        ({k: _digest(k) for k in KINDS[:3]}, "no digest for the serve-gpu image"),
        ({**{k: _digest(k) for k in KINDS}, "gpu": "sha256:abc"}, "is not a digest"),
    ],
    ids=["missing", "malformed"],
)
def test_release_sh_refuses_a_missing_or_malformed_digest(tmp_path, digests, message):
    proc = _release(tmp_path, digests, NVAE="false")  # stops before compiling
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "dist").exists()


def test_an_image_digest_pins_that_image_only():
    images = Images("ghcr.io/example-org", "0.1.0", (("cpu", _digest("cpu")),))
    assert images.cpu == f"ghcr.io/example-org/nvae-cpu:0.1.0@{_digest('cpu')}"
    assert images.gpu == "ghcr.io/example-org/nvae-gpu:0.1.0"
    with pytest.raises(ConfigError, match="'tpu': the images are cpu, gpu"):
        Images(digests=(("tpu", _digest("cpu")),))
    with pytest.raises(ConfigError, match="'sha256:ABC' for gpu"):
        Images(digests=(("gpu", "sha256:ABC"),))


def test_a_bad_image_digest_is_one_line_naming_it(tmp_path, capsys):
    out = tmp_path / "spec.yaml"
    assert main(["pipeline", "compile", "--out", str(out), "--image-digest", "cpu=latest"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'latest' for cpu" in err
    assert not out.exists()
