#!/usr/bin/env bash
# Create (or refresh) the project venv in .venv with every dependency, in one pip resolver run.
# Idempotent: a second call only re-checks. Usage: bash scripts/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[dev,data]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
