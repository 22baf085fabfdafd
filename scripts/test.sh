#!/usr/bin/env bash
# Install what the tests need, then run the default test suite (slow tests excluded; `-m slow` runs them).
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# checkov, for the manifests' policy test (tests/mlops/test_checkov.py), in a venv of its own: its pins
# (boto3, packaging) conflict with the project's.
if [ ! -x .venv-checkov/bin/checkov ]; then
  echo "test: installing checkov 3.3.30 into .venv-checkov" >&2
  "${PYTHON:-python3}" -m venv .venv-checkov
  .venv-checkov/bin/python -m pip install -q checkov==3.3.30 2>&1 | grep -v "^WARNING: Location" || true
  .venv-checkov/bin/checkov --version >/dev/null  # fail here, clearly, if the install did not work
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -m "not slow and not gpu" -q "$@"
