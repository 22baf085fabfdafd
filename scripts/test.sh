#!/usr/bin/env bash
# Install what the tests need, then run the default test suite (slow tests excluded; `-m slow` runs them).
# Usage: bash scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -m "not slow and not gpu" -q "$@"
