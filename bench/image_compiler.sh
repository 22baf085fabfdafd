#!/usr/bin/env bash
# Training speed in the CPU image with and without a C++ compiler and Python's headers.
#
# Usage: bash bench/image_compiler.sh [IMAGE] [ROUNDS]
#   IMAGE   a CPU image without a compiler, `bash scripts/images.sh --no-compiler` (default: the name it gives)
#   ROUNDS  alternating rounds of each variant (default 2)
#
# The compiled CPU kernels (model/kernels.py) run only where inductor finds g++ and Python.h; without them,
# or with NVAE_COMPILED_KERNELS=0, the ATen/oneDNN paths run instead. This builds IMAGE plus g++ and
# python3.11-dev (what the Dockerfile's WITH_COMPILER=1 adds on a Debian base) as a second image and,
# alternating, times training steps (bench/train_throughput.py, `mnist`, batch 32, fp32, channels-last) in: IMAGE as it is; the second image with the kernels switched off;
# the second image as it runs by default. Every container starts with an empty inductor cache, as a new pod
# does; the first step's time (its compilation included) is printed for each. Also prints both images' sizes.
# Where CONTAINERS_CONF is unset, podman runs with runc and without default ulimits (scripts/container_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
registry=$(sed -n 's/^DEFAULT_REGISTRY = "\(.*\)"/\1/p' components/images.py)
tag=$(sed -n 's/^DEFAULT_TAG = "\([^"]*\)".*/\1/p' components/images.py)
image=${1:-$registry/nvae-cpu:$tag}
rounds=${2:-2}
with_cxx=localhost/nvae-cpu-with-cxx:bench
if [ -z "${CONTAINERS_CONF:-}" ]; then  # machines whose sandbox refuses podman's default ulimits, and crun
  CONTAINERS_CONF=$(mktemp)
  printf '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n' > "$CONTAINERS_CONF"
  export CONTAINERS_CONF
  trap 'rm -f "$CONTAINERS_CONF"' EXIT
fi

if podman run --rm "$image" sh -c 'command -v g++' >/dev/null 2>&1; then
  echo "image_compiler.sh: $image has g++ already: build it with scripts/images.sh --no-compiler" >&2
  exit 2
fi
podman build --network=host -v /etc/ssl/certs:/etc/ssl/certs:ro -t "$with_cxx" -f - . <<EOF
FROM $image
USER root
RUN apt-get update && apt-get install -y --no-install-recommends g++ python3.11-dev \\
 && rm -rf /var/lib/apt/lists/*
USER 10001:10001
EOF

run() {  # IMAGE KERNELS STEPS WARMUP: s/step in one fresh container (median of STEPS after WARMUP steps)
  podman run --rm -e NVAE_COMPILED_KERNELS="$2" -v "$PWD/bench:/bench:ro" "$1" \
    python /bench/train_throughput.py --preset mnist --batch 32 --steps "$3" --warmup "$4" --variants fp32-cl \
    | awk '$1 == "fp32-cl" {print $2}'
}

declare -A steps
for r in $(seq "$rounds"); do
  a=$(run "$image" 1 4 1) b=$(run "$with_cxx" 0 4 1) c=$(run "$with_cxx" 1 4 1)
  steps[plain]+="$a " steps[off]+="$b " steps[on]+="$c "
  echo "round $r: $a $b $c" >&2
done
echo "s/step, median of 4 steps after one warm-up step, per round:"
printf '  %-52s %s\n' "$image (no compiler)" "${steps[plain]}" \
  "with g++ and python3.11-dev, NVAE_COMPILED_KERNELS=0" "${steps[off]}" \
  "with g++ and python3.11-dev (compiled kernels on)" "${steps[on]}"
echo "the first step of a fresh container, s:"
printf '  %-52s %s\n' "$image (no compiler)" "$(run "$image" 1 1 0)" \
  "with g++ and python3.11-dev (empty inductor cache)" "$(run "$with_cxx" 1 1 0)"
echo "image sizes:"
podman images --format '  {{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "nvae-cpu(-with-cxx)?:" || true
