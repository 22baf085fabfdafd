#!/usr/bin/env bash
# Create (or refresh) the project venv in .venv with every dependency in one pip resolver run, and install the
# embedded dataset (Debian's dataset-fashion-mnist). Idempotent: a second call only re-checks.
# Usage: bash scripts/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian package dataset-fashion-mnist" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: warning: /usr/share/datasets/fashion-mnist is missing; install dataset-fashion-mnist" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "setup: installing dependencies into .venv (first run: a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  # DALI's CUDA 12 wheel (before the switch to -cuda130) installs the same nvidia.dali package: never both.
  .venv/bin/python -m pip uninstall -y -q nvidia-dali-cuda120 2>/dev/null || true
  .venv/bin/python -m pip install -q -e ".[all]" 2>&1 | grep -v -e "^WARNING: Location" -e "BuildBackendWarning" -e '^ ' || true
  .venv/bin/python -c "import torch, model" # fail here, clearly, if the install did not work
  rm -f .venv/.installed-*
  touch "$stamp"
fi
