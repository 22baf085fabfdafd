#!/usr/bin/env bash
# Regenerate the images' hash-locked requirements, k8s/images/locks/KIND.in and KIND.txt, from pyproject.toml.
#
# Usage: bash scripts/lock.sh [KIND ...] [--upgrade]
#   KIND        cpu, gpu, serve-cpu, serve-gpu (default: all four)
#   --upgrade   take the newest versions pyproject allows (default: keep each lock's pins where they still fit)
# Each lock is resolved with uv for the image's interpreter and platform (`# target:` in its header), not this
# machine's, from PyPI. The gpu locks must agree on one CUDA major across torch, DALI and onnxruntime-gpu:
# finishing a lock fails where they do not. Run after any dependency change in pyproject.toml;
# tests/mlops/test_image_locks.py fails until the locks match it.
set -euo pipefail
cd "$(dirname "$0")/.."

kinds=() upgrade=()
while [ $# -gt 0 ]; do
  case "$1" in
    cpu|gpu|serve-cpu|serve-gpu) kinds+=("$1") ;;
    --upgrade) upgrade=(--upgrade) ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "lock.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ ${#kinds[@]} -gt 0 ] || kinds=(cpu gpu serve-cpu serve-gpu)

py=.venv/bin/python
[ -x "$py" ] || py=python3
uv=.venv/bin/uv
[ -x "$uv" ] || uv=$(command -v uv || true)
[ -n "$uv" ] || { echo "lock.sh: uv not found (pip install uv, or install the dev extra)" >&2; exit 2; }
uv=$(realpath "$uv")
platform=$("$py" -c 'import sys; sys.path.insert(0, "k8s/images"); import lockfiles; print(lockfiles.PLATFORM)')

mkdir -p k8s/images/locks
for kind in "${kinds[@]}"; do
  version=$("$py" k8s/images/lockfiles.py python "$kind")
  "$py" k8s/images/lockfiles.py inputs "$kind" > "k8s/images/locks/$kind.in"
  # Run from the locks folder so that the lock's `# via -r KIND.in` names its neighbour.
  (cd k8s/images/locks && "$uv" pip compile "$kind.in" -o "$kind.txt" "${upgrade[@]}" --quiet \
    --generate-hashes --no-header --python-version "$version" --python-platform "$platform" \
    --default-index https://pypi.org/simple)
  "$py" k8s/images/lockfiles.py finish "$kind" "k8s/images/locks/$kind.txt"
done
