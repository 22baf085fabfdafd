#!/usr/bin/env bash
# The main job, end to end on the embedded default (Fashion-MNIST, the small CPU preset `fmnist-cpu`): the
# Kubeflow pipeline's DAG run on this machine by kfp.local -- DALI preparation, training, importance-weighted
# evaluation, BN readjustment, ONNX export and sampling with onnxruntime. Installs what it needs first.
# Usage: bash scripts/demo.sh [--set key=value ...]   (e.g. --set steps=1000; results under runs/pipeline/)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
nvae info --preset fmnist-cpu
exec nvae pipeline run --local --root runs/pipeline "$@"
