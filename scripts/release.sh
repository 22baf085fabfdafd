#!/usr/bin/env bash
# Compile a release's pipeline spec against the images it pushed, each pinned by its digest, and list them.
#
# Usage: bash scripts/release.sh --registry R --tag T --digests DIR [--out DIR]
#   --registry R   where the images were pushed, e.g. ghcr.io/nvae-pipeline
#   --tag T        their tag, e.g. 0.1.0
#   --digests DIR  one file per image, named cpu, gpu, serve-cpu and serve-gpu, holding the sha256:... digest
#                  the push reported (.github/workflows/release.yml writes them)
#   --out DIR      where the release's files go (default: dist):
#                    nvae_pipeline.yaml  the pipeline spec, every step in R/nvae-cpu|gpu:T@sha256:...
#                    images.yaml         the four images by digest, in the form of k8s/images.yaml
# The `nvae` that compiles is $NVAE where set (a command line, e.g. `docker run ... R/nvae-cpu:T@sha256:...
# nvae`: the released image itself), else .venv/bin/nvae, else nvae on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

registry="" tag="" digests="" out=dist
while [ $# -gt 0 ]; do
  case "$1" in
    --registry) registry=$2; shift ;;
    --tag) tag=$2; shift ;;
    --digests) digests=$2; shift ;;
    --out) out=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "release.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$registry" ] && [ -n "$tag" ] && [ -n "$digests" ] \
  || { echo "release.sh: --registry, --tag and --digests are required (see --help)" >&2; exit 2; }

declare -A digest
for kind in cpu gpu serve-cpu serve-gpu; do
  file=$digests/$kind
  [ -f "$file" ] || { echo "release.sh: no digest for the $kind image ($file)" >&2; exit 2; }
  value=$(tr -d '[:space:]' < "$file")
  [[ $value =~ ^sha256:[0-9a-f]{64}$ ]] \
    || { echo "release.sh: $file: '$value' is not a digest (sha256:<64 hex digits>)" >&2; exit 2; }
  digest[$kind]=$value
done

if [ -n "${NVAE:-}" ]; then read -r -a nvae <<<"$NVAE"
elif [ -x .venv/bin/nvae ]; then nvae=(.venv/bin/nvae)
else nvae=(nvae)
fi

mkdir -p "$out"
"${nvae[@]}" pipeline compile --out "$out/nvae_pipeline.yaml" --image-registry "$registry" --image-tag "$tag" \
  --image-digest "cpu=${digest[cpu]}" --image-digest "gpu=${digest[gpu]}"
{
  echo "# The images of release $tag, each pinned by digest; nvae_pipeline.yaml runs its steps in cpu and gpu."
  for kind in cpu gpu serve-cpu serve-gpu; do
    echo "$kind: $registry/nvae-$kind:$tag@${digest[$kind]}"
  done
} > "$out/images.yaml"
echo "release: $out/nvae_pipeline.yaml, $out/images.yaml"
