#!/usr/bin/env bash
# Every CUDA path of the project in one run (< 8 minutes on one H200): fp32/bf16/fp16 training steps, the
# gpu-marked tests, DALI GPU preparation vs CPU, onnxruntime-gpu parity and ms/image.
# Usage (device tool): bash bench/gpu_check.sh "$OUT"      -> $OUT/gpu_check.json, $OUT/*.log
# Wheels missing on the GPU image (nvidia-dali-cuda130, onnxruntime-gpu, ...) can travel in .whl/ (carry it).
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>&1 || true
timeout 470 $PY bench/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
