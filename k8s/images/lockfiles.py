"""The images' hash-locked requirements (k8s/images/locks/KIND.txt): what each image asks for, and the lock files.

What each image installs is derived from pyproject.toml here, in one place: scripts/lock.sh writes it to
`locks/KIND.in`, resolves `locks/KIND.txt` from that with uv and finishes its header here; the Dockerfiles
install `KIND.txt` with `pip install --require-hashes --no-deps`; tests/mlops/test_image_locks.py checks the
locks against pyproject. Standard library only (it runs in the images' build stage, before any venv exists).

    python3 k8s/images/lockfiles.py inputs KIND          # KIND.in, printed
    python3 k8s/images/lockfiles.py python KIND          # the Python version KIND's lock is resolved for
    python3 k8s/images/lockfiles.py finish KIND LOCK     # give uv's output LOCK its header (in place)
    python3 k8s/images/lockfiles.py prepare LOCK DIR [--torch REQ [--torchvision REQ]]   # in a build: DIR/build.txt, DIR/runtime.txt
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The images' platform (their Debian 12 / Ubuntu 24.04 bases have glibc >= 2.36).
PLATFORM = "x86_64-manylinux_2_28"
RUNTIME_EXTRAS = ("data", "train", "onnx", "serve", "pipeline", "fid")  # what the `nvae` images run (not mlops, dev)
# Replaces `onnxruntime` in the CUDA images (never both: they are one module). From 1.27 its `cuda` extra asks
# for CUDA 13's runtime (nvidia-cuda-runtime 13), the CUDA of torch 2.14's and nvidia-dali-cuda130's wheels;
# 1.26 and older ask for CUDA 12's.
GPU_ONNXRUNTIME = "onnxruntime-gpu[cuda,cudnn]"
GPU_ONNXRUNTIME_FLOOR = ">=1.27"
# Installed first: the project (and any sdist in a lock) then builds without isolation, from the lock.
BUILD_BACKEND = ("setuptools",)
# The packages whose CUDA libraries must agree on one major version (in the images that hold them).
CUDA_USERS = ("torch", "nvidia-dali-cuda130", "onnxruntime-gpu")
# Packages whose own version is the CUDA version (not a library's: nvidia-cufft 12.0 belongs to CUDA 13.0).
CUDA_VERSIONED = ("cuda-toolkit", "cuda-bindings", "nvidia-cuda-runtime", "nvidia-cuda-nvrtc")


@dataclass(frozen=True)
class Image:
    """What one image takes: the project with its runtime extras, or the serving list alone."""

    python: str  # the interpreter of the image's default base
    project: bool  # installs the project (pip install --no-deps .) with RUNTIME_EXTRAS' requirements
    cuda: bool  # onnxruntime-gpu instead of onnxruntime
    description: str


IMAGES = {
    "cpu": Image(
        "3.11",
        True,
        False,
        "the nvae CLI, PyTorch (PyPI's build; a build can take a CPU-only wheel instead), DALI (CPU mode), "
        "onnxruntime, kfp",
    ),
    "gpu": Image(
        "3.12", True, True, "the nvae CLI, PyTorch's CUDA build, DALI for CUDA 13, onnxruntime-gpu, kfp"
    ),
    "serve-cpu": Image("3.11", False, False, "the ONNX sampler alone: onnxruntime, numpy, the HTTP servers"),
    "serve-gpu": Image("3.12", False, True, "the ONNX sampler alone on CUDA: onnxruntime-gpu"),
}


def canonical(name: str) -> str:
    """A distribution name as PEP 503 compares them: `Prometheus_Client` -> `prometheus-client`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return canonical(match.group(1))


def serve_names(root: Path = ROOT) -> list[str]:
    """The names in k8s/images/serve-requirements.txt (what `python -m serving` needs)."""
    text = (root / "k8s" / "images" / "serve-requirements.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def runtime_requirements(root: Path = ROOT) -> list[str]:
    """pyproject.toml's dependencies and RUNTIME_EXTRAS' requirements, as written there."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return list(project["dependencies"]) + [r for extra in RUNTIME_EXTRAS for r in extras[extra]]


def inputs(kind: str, root: Path = ROOT) -> list[str]:
    """The requirements image `kind` is resolved from, as pyproject.toml writes them (ranges, markers)."""
    image = IMAGES[kind]
    runtime = runtime_requirements(root)
    if image.project:
        build = tomllib.loads((root / "pyproject.toml").read_text())["build-system"]["requires"]
        wanted = runtime + list(build)
    else:  # each serving name with pyproject's range for it, where pyproject names it
        by_name = {}
        for r in runtime:
            by_name.setdefault(requirement_name(r), r)
        wanted = [by_name.get(canonical(n), n) for n in serve_names(root)]
    seen, out = set(), []
    for r in wanted:
        name = requirement_name(r)
        if image.cuda and name == "onnxruntime":
            rest = r[len("onnxruntime") :]
            r = GPU_ONNXRUNTIME + (rest + "," if rest else "") + GPU_ONNXRUNTIME_FLOOR
            name = "onnxruntime-gpu"
        if name not in seen:
            seen.add(name)
            out.append(r)
    return out


def render_inputs(kind: str, root: Path = ROOT) -> str:
    """The text of locks/KIND.in: a short header, then inputs(kind)."""
    image = IMAGES[kind]
    source = (
        f"pyproject.toml: dependencies, extras {','.join(RUNTIME_EXTRAS)}, build-system requires"
        if image.project
        else "k8s/images/serve-requirements.txt, with pyproject.toml's ranges"
    )
    head = [f"# {kind} image: {image.description}.", f"# From {source}."]
    if image.cuda:
        head.append(
            f"# {GPU_ONNXRUNTIME} in place of onnxruntime (never both: they are one module), "
            f"{GPU_ONNXRUNTIME_FLOOR[2:]} or newer for CUDA 13."
        )
    head.append(f"# Written by scripts/lock.sh; do not edit. Resolved into {kind}.txt.")
    return "\n".join(head + inputs(kind, root)) + "\n"


# --- lock files ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One package of a lock: `name==version`, its sha256 hashes and what needs it (uv's `# via` notes)."""

    name: str
    version: str
    hashes: tuple[str, ...]
    via: tuple[str, ...]
    text: str  # the entry's lines as written


def entries(text: str) -> tuple[list[str], list[Entry]]:
    """Split a lock into its header lines (comments, pip options) and its entries (in file order)."""
    header: list[str] = []
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if line[:1].isspace() and blocks:
            blocks[-1].append(line)
        elif line.startswith(("#", "-")) or not line.strip():
            if blocks:
                raise ValueError(f"lock: comment or option between entries at column 0: {line!r}")
            header.append(line)
        else:
            blocks.append([line])
    found = []
    for block in blocks:
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)", block[0])
        if not match:
            raise ValueError(f"lock: not an exact pin: {block[0]!r}")
        body = "\n".join(block)
        via: list[str] = []
        in_via = False
        for line in block[1:]:
            note = line.strip()
            if note == "# via" or note.startswith("# via "):
                in_via = True
                via += [note[len("# via") :].strip()] if note != "# via" else []
            elif in_via and note.startswith("#   "):
                via.append(note[1:].strip())
            else:
                in_via = False
        found.append(
            Entry(
                canonical(match.group(1)),
                match.group(3),
                tuple(re.findall(r"--hash=sha256:([0-9a-f]{64})", body)),
                tuple(via),
                body,
            )
        )
    return header, found


def parse(text: str) -> dict[str, Entry]:
    return {e.name: e for e in entries(text)[1]}


def needed_by(entry: Entry) -> set[str]:
    """The packages that need `entry` (its `# via` names), `-r FILE` for the lock's own inputs."""
    return {v if v.startswith("-") else requirement_name(v) for v in entry.via}


def target_python(text: str) -> str:
    """The Python version a lock was resolved for, from its `# target: python X.Y, PLATFORM` line."""
    match = re.search(r"^# target: python (\d+\.\d+), ", text, flags=re.M)
    if not match:
        raise ValueError("lock: no '# target: python X.Y, PLATFORM' line")
    return match.group(1)


def cuda_major(entry: Entry) -> int | None:
    """The CUDA major version an entry belongs to, from its name (`-cu13`, `-cuda130`) or, for CUDA's own
    packages (CUDA_VERSIONED), its version; None for a package that names no CUDA."""
    if match := re.search(r"-cu(\d+)$", entry.name):
        return int(match.group(1))
    if match := re.search(r"-cuda(\d{2,3})$", entry.name):  # nvidia-dali-cuda130: CUDA 13.0
        digits = match.group(1)
        return int(digits[:-1]) if len(digits) == 3 else int(digits)
    if entry.name in CUDA_VERSIONED:
        return int(entry.version.split(".")[0])
    return None


def cuda_majors(found: dict[str, Entry], package: str) -> dict[str, int]:
    """What shows the CUDA major of `package` in a lock: its own name, and each entry it needs that names a
    CUDA (uv's `# via` lines), as {entry name: major}."""
    evidence = {}
    if package in found and (major := cuda_major(found[package])) is not None:
        evidence[package] = major
    for entry in found.values():
        if package in needed_by(entry) and (major := cuda_major(entry)) is not None:
            evidence[entry.name] = major
    return evidence


def cuda_line(found: dict[str, Entry]) -> str:
    """The header line naming the one CUDA major of the lock's CUDA_USERS; raises where they disagree."""
    users = {p: cuda_majors(found, p) for p in CUDA_USERS if p in found}
    users = {p: ev for p, ev in users.items() if ev}
    majors = {m for ev in users.values() for m in ev.values()}
    if len(majors) > 1:
        detail = "; ".join(f"{p}: {', '.join(f'{n} {m}' for n, m in ev.items())}" for p, ev in users.items())
        raise ValueError(f"lock: CUDA majors disagree ({detail})")
    if not majors:
        return ""
    names = ", ".join(f"{p} {found[p].version}" for p in users)
    return f"# CUDA {majors.pop()}: {names} (the CUDA packages each needs, below)"


def finish(kind: str, text: str) -> str:
    """uv's output `text` for image `kind` with the lock's header: what it is, its target, its CUDA."""
    image = IMAGES[kind]
    _, found = entries(text)
    head = [
        f"# {kind} image: hash-locked requirements. Install with",
        f"#   pip install --require-hashes --no-deps -r {kind}.txt",
        f"# target: python {image.python}, {PLATFORM}",
        f"# Resolved from {kind}.in by uv (bash scripts/lock.sh); do not edit.",
    ]
    if line := cuda_line({e.name: e for e in found}):
        head.append(line)
    return "\n".join(head + [e.text for e in found]) + "\n"


def replace_entry(text: str, name: str, new: str) -> str:
    """`text` with the entry of `name` replaced by `new` (lines of a requirements file)."""
    header, found = entries(text)
    if canonical(name) not in {e.name for e in found}:
        raise ValueError(f"lock: no entry for {name}")
    body = [new.rstrip("\n") if e.name == canonical(name) else e.text for e in found]
    return "\n".join(header + body) + "\n"


def only_for(found: dict[str, Entry], package: str) -> set[str]:
    """The CUDA packages (nvidia-*, cuda-*, triton) that the lock holds only because `package` needs them,
    directly or through another of them."""
    cuda = {n for n in found if n.startswith(("nvidia-", "cuda-")) or n == "triton"}
    dropped: set[str] = set()
    while True:
        more = {n for n in cuda - dropped if needed_by(found[n]) <= dropped | {package}}
        if not more:
            return dropped
        dropped |= more


def prepare(lock: Path, out: Path, torch: str = "", torchvision: str = "") -> tuple[Path, Path]:
    """In an image's build stage: check this interpreter is the lock's target, then write out/build.txt (the
    build backend's entries, installed first) and out/runtime.txt (the whole lock; with `torch`, a
    requirement line such as `torch==2.13.0+cpu --hash=sha256:...` in place of the locked torch, and
    without the CUDA packages only the locked torch needed; `torchvision`, the line of the torchvision built
    for that torch, in place of the locked one, which pins the locked torch)."""
    text = lock.read_text()
    want, have = target_python(text), f"{sys.version_info.major}.{sys.version_info.minor}"
    if want != have:
        raise SystemExit(
            f"lockfiles: {lock.name} is resolved for Python {want}, this base image has {have}: "
            f"use a base with Python {want} (BASE_IMAGE) or regenerate the lock (scripts/lock.sh)"
        )
    if torch:
        if requirement_name(torch) != "torch" or not re.search(r"--hash=sha256:[0-9a-f]{64}", torch):
            raise SystemExit(f"lockfiles: --torch wants 'torch==V --hash=sha256:H', got {torch!r}")
        header, found = entries(text)
        drop = only_for({e.name: e for e in found}, "torch")
        text = "\n".join(header + [e.text for e in found if e.name not in drop]) + "\n"
        text = replace_entry(text, "torch", torch)
        if "torchvision" in {e.name for e in found}:
            if requirement_name(torchvision or "x") != "torchvision" or "--hash=sha256:" not in torchvision:
                raise SystemExit(
                    "lockfiles: the lock's torchvision pins the lock's torch: with --torch, give --torchvision "
                    f"'torchvision==V --hash=sha256:H' of the torchvision built for it, got {torchvision!r}"
                )
            text = replace_entry(text, "torchvision", torchvision)
    found = parse(text)
    out.mkdir(parents=True, exist_ok=True)
    build, runtime = out / "build.txt", out / "runtime.txt"
    build.write_text("".join(found[n].text + "\n" for n in BUILD_BACKEND if n in found))
    runtime.write_text(text)
    return build, runtime


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for command in ("inputs", "python"):
        sub.add_parser(command).add_argument("kind", choices=sorted(IMAGES))
    f = sub.add_parser("finish")
    f.add_argument("kind", choices=sorted(IMAGES))
    f.add_argument("lock", type=Path)
    p = sub.add_parser("prepare")
    p.add_argument("lock", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--torch", default="", help="requirement line replacing the lock's torch entry")
    p.add_argument("--torchvision", default="", help="with --torch: the line replacing the lock's torchvision")
    args = ap.parse_args(argv)
    if args.command == "inputs":
        sys.stdout.write(render_inputs(args.kind))
    elif args.command == "python":
        print(IMAGES[args.kind].python)
    elif args.command == "finish":
        try:
            text = finish(args.kind, args.lock.read_text())
        except ValueError as e:
            raise SystemExit(f"lockfiles: {args.lock}: {e}") from None
        args.lock.write_text(text)
        print(f"lockfiles: {args.lock} ({len(parse(text))} packages)")
    else:
        build, runtime = prepare(args.lock, args.out, args.torch, args.torchvision)
        print(f"lockfiles: {runtime} ({len(parse(runtime.read_text()))} packages), {build}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
