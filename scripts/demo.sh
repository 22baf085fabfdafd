#!/usr/bin/env bash
# The main job, end to end on the embedded default: Fashion-MNIST with the small CPU preset `fmnist-cpu`.
# Installs what it needs, then: describe the model, prepare the data, train a short run.
# Usage: bash scripts/demo.sh [RUN_DIR]   (default runs/demo; STEPS=... to change the training length)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
RUN=${1:-runs/demo}
STEPS=${STEPS:-300}
export PATH="$PWD/.venv/bin:$PATH"
nvae info --preset fmnist-cpu
nvae prepare --dataset fashion-mnist --source /usr/share/datasets/fashion-mnist --out "$RUN/data"
nvae train --preset fmnist-cpu --data "$RUN/data" --out "$RUN/train" --steps "$STEPS" --checkpoint-every 100
echo "demo: outputs in $RUN (data/, train/checkpoint.pt, train/train_metrics.jsonl, train/train_summary.json)"
