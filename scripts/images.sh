#!/usr/bin/env bash
# Build the project's container images with podman or docker (whichever exists; podman first).
#
# Usage: bash scripts/images.sh [--gpu | --all | --serve | --serve-gpu] [--registry R] [--tag T] [--debian-base]
#                               [--torch-version V] [--torch-index URL|pypi] [--no-compiler] [--keep-build-cache]
#   (default)        the cpu image, REGISTRY/nvae-cpu:TAG
#   --gpu / --all    the gpu image instead / both
#   --serve          the slim serving image (nvae-serve-cpu: onnxruntime + the sampler, no torch);
#   --serve-gpu      its CUDA twin (nvae-serve-gpu: onnxruntime-gpu)
#   --registry, --tag  the names the pipeline is compiled against (`nvae pipeline compile --image-registry R
#                    --image-tag T`); defaults from components/images.py
#   --debian-base    make the base image from Debian's own packages (mmdebstrap + import), for machines that
#                    reach no container registry; it is passed to the Dockerfiles as BASE_IMAGE
#   --torch-version  the cpu image's torch instead of its lock's (PyPI's build, with CUDA's libraries), e.g.
#                    2.14.1+cpu, PyTorch's CPU build: a 2 GB image instead of 7 GB. The wheel is taken from a
#                    local find-links folder where one has it, else downloaded from --torch-index; it is
#                    installed with its sha256, and the CUDA packages only the lock's torch needs are left out
#   --torch-index    where --torch-version's wheel is downloaded from (default: PyTorch's CPU index; `pypi`:
#                    PyPI); without --torch-version the lock's torch is installed and this is ignored
#   --no-compiler    the cpu image without g++ and Python's headers (about 450 MB less; training steps run the ATen
#                    paths in place of the compiled CPU kernels, about 9 % slower, bench/RESULTS.md)
#   --keep-build-cache  keep the build stage's untagged image (faster rebuilds; several GB)
# Every image installs its hash-locked requirements, k8s/images/locks/KIND.txt: scripts/lock.sh regenerates
# them after a dependency change.
# With podman, local package mirrors named in this machine's pip configuration (file:// indexes, find-links
# folders) are mounted read-only into the build and passed on, so pip takes what is on disk before it downloads.
# Prints each image's size at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

registry=$(sed -n 's/^DEFAULT_REGISTRY = "\(.*\)"/\1/p' components/images.py)
tag=$(sed -n 's/^DEFAULT_TAG = "\([^"]*\)".*/\1/p' components/images.py)
kinds=(cpu) debian_base=0 keep_cache=0 with_compiler=1 torch_index=https://download.pytorch.org/whl/cpu torch_version=
while [ $# -gt 0 ]; do
  case "$1" in
    --gpu) kinds=(gpu) ;;
    --all) kinds=(cpu gpu) ;;
    --serve) kinds=(serve-cpu) ;;
    --serve-gpu) kinds=(serve-gpu) ;;
    --registry) registry=$2; shift ;;
    --tag) tag=$2; shift ;;
    --debian-base) debian_base=1 ;;
    --keep-build-cache) keep_cache=1 ;;
    --no-compiler) with_compiler=0 ;;
    --torch-index) torch_index=$2; shift ;;
    --torch-version) torch_version=$2; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "images.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ "$torch_index" = pypi ] && torch_index=""

if command -v podman >/dev/null; then engine=podman
elif docker info >/dev/null 2>&1; then engine=docker
else echo "images.sh: neither podman nor a running docker engine found (apt-get install podman)" >&2; exit 2
fi

dangling() { $engine images --filter dangling=true --format '{{.ID}}' | sort; }
# Where the engine keeps its layers (for the free-space figure in an error).
if [ "$engine" = podman ]; then storage=$(podman info --format '{{.Store.GraphRoot}}' 2>/dev/null || echo /)
else storage=$(docker info --format '{{.DockerRootDir}}' 2>/dev/null || echo /); fi

args=(--network=host)
extra_index="" find_links=""
# podman mounts host folders into RUN steps (docker build cannot): the host's CA bundle, for TLS to the
# package indexes, and the local mirrors of the host's pip configuration (each folder read-only, the same URLs).
if [ "$engine" = podman ]; then
  [ -d /etc/ssl/certs ] && args+=(-v /etc/ssl/certs:/etc/ssl/certs:ro)
  pip_conf=$(python3 -m pip config list 2>/dev/null || true)
  for url in $(sed -n "s/^global\.extra-index-url='\(.*\)'/\1/p" <<<"$pip_conf"); do
    dir=${url#file://}
    if [ "$dir" != "$url" ] && [ -d "$dir" ]; then
      mount=$(dirname "$dir"); args+=(-v "$mount:$mount:ro"); extra_index="$extra_index $url"
    fi
  done
  for dir in $(sed -n "s/^global\.find-links='\(.*\)'/\1/p" <<<"$pip_conf"); do
    if [ -d "$dir" ]; then args+=(-v "$dir:$dir:ro"); find_links="$find_links $dir"; fi
  done
fi

# The cpu image's torch: the lock's, or --torch-version's wheel installed with its sha256.
torch_requirement="" torchvision_requirement=""
if [ -n "$torch_version" ] && [[ " ${kinds[*]} " == *" cpu "* ]]; then
  [ "$engine" = podman ] || { echo "images.sh: --torch-version needs podman (a local wheel)" >&2; exit 2; }
  pyver=$(python3 k8s/images/lockfiles.py python cpu) abi=cp$(python3 k8s/images/lockfiles.py python cpu | tr -d .)
  wheel=""
  for dir in $find_links; do
    wheel=$(ls "$dir/torch-$torch_version-$abi-$abi-"*x86_64.whl 2>/dev/null | head -1 || true)
    [ -n "$wheel" ] && break
  done
  if [ -z "$wheel" ]; then
    wheels=$(mktemp -d)
    trap 'rm -rf "$wheels"' EXIT
    echo "images: downloading torch==$torch_version (${torch_index:-PyPI})" >&2
    python3 -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$pyver" \
      --platform manylinux_2_28_x86_64 ${torch_index:+--index-url "$torch_index"} -d "$wheels" "torch==$torch_version"
    wheel=$(ls "$wheels"/torch-*.whl)
    args+=(-v "$wheels:$wheels:ro"); find_links="$find_links $wheels"
  fi
  torch_requirement="torch==$torch_version --hash=sha256:$(sha256sum "$wheel" | cut -d' ' -f1)"
  echo "images: the cpu image's torch: $(basename "$wheel")" >&2
  # The lock's torchvision pins the lock's torch: the one built for this torch (torch 2.N pairs with
  # torchvision 0.(N+15), of the same build: a +cpu torch takes a +cpu torchvision, PyPI's plain one fails to
  # import beside it), its newest patch release found locally (a find-links folder or a local index's files),
  # else downloaded from --torch-index.
  minor=$(cut -d. -f2 <<<"${torch_version%%+*}")
  tv="0.$((minor + 15))" build=""
  [[ "$torch_version" == *+* ]] && build="+${torch_version#*+}"
  dirs="$find_links"
  for url in $extra_index; do d=$(dirname "${url#file://}")/files; [ -d "$d" ] && dirs="$dirs $d"; done
  vwheel=$(for dir in $dirs; do ls "$dir/torchvision-$tv".*"-$abi-$abi-"*x86_64.whl 2>/dev/null || true; done \
    | awk -v b="$build" '{ n = split($0, p, "/"); v = p[n]; sub(/^torchvision-[^-+]*/, "", v); sub(/-.*/, "", v); if (v == b) print }' \
    | sort -V | tail -1)
  if [ -z "$vwheel" ] && [ -n "$build" ] && [ -z "$torch_index" ]; then
    echo "images.sh: no torchvision $tv.*$build wheel beside torch $torch_version in the find-links folders, and" \
      "PyPI has no $build builds: put one there, or pass --torch-index https://download.pytorch.org/whl/${build#+}" >&2
    exit 2
  fi
  if [ -z "$vwheel" ]; then
    vwheels=$(mktemp -d)
    trap 'rm -rf "${wheels:-}" "$vwheels"' EXIT
    echo "images: downloading torchvision==$tv.* (${torch_index:-PyPI})" >&2
    python3 -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$pyver" \
      --platform manylinux_2_28_x86_64 ${torch_index:+--index-url "$torch_index"} -d "$vwheels" "torchvision==$tv.*"
    vwheel=$(ls "$vwheels"/torchvision-*.whl)
  fi
  vdir=$(dirname "$vwheel")
  [[ " $find_links " == *" $vdir "* ]] || { args+=(-v "$vdir:$vdir:ro"); find_links="$find_links $vdir"; }
  tv_version=$(basename "$vwheel" | cut -d- -f2)
  torchvision_requirement="torchvision==$tv_version --hash=sha256:$(sha256sum "$vwheel" | cut -d' ' -f1)"
  echo "images: the cpu image's torchvision: $(basename "$vwheel")" >&2
fi
args+=(--build-arg "PIP_EXTRA_INDEX_URL=${extra_index# }" --build-arg "PIP_FIND_LINKS=${find_links# }")

if [ "$debian_base" = 1 ]; then
  base=localhost/nvae-base:bookworm
  if ! $engine image exists "$base" 2>/dev/null && ! $engine image inspect "$base" >/dev/null 2>&1; then
    command -v mmdebstrap >/dev/null || { echo "images.sh: --debian-base needs mmdebstrap" >&2; exit 2; }
    tmp=$(mktemp -d)
    echo "images: making $base from Debian packages (mmdebstrap)" >&2
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$tmp/base.tar"
    $engine import "$tmp/base.tar" "$base" >/dev/null
    rm -rf "$tmp"
  fi
  args+=(--build-arg "BASE_IMAGE=$base")
fi

for kind in "${kinds[@]}"; do
  image="$registry/nvae-$kind:$tag"
  build=("${args[@]}")
  [ "$kind" = cpu ] && build+=(--build-arg "TORCH_REQUIREMENT=$torch_requirement" \
    --build-arg "TORCHVISION_REQUIREMENT=$torchvision_requirement" --build-arg "WITH_COMPILER=$with_compiler")
  if [ "$engine" = podman ]; then ignore=(--ignorefile "k8s/images/$kind.Dockerfile.dockerignore"); else ignore=(); fi
  echo "images: building $image with $engine" >&2
  before=$(dangling)
  start=$(date +%s)
  # The build stage (up to a 7 GB venv) and the image this one replaces stay behind untagged: remove what
  # this build left, failed builds included (a full disk must not stay full), unless --keep-build-cache
  # (they make the next build of unchanged sources faster).
  drop_left() {
    if [ "$keep_cache" = 0 ]; then
      for id in $(comm -13 <(echo "$before") <(dangling)); do $engine rmi -f "$id" >/dev/null 2>&1 || true; done
    fi
  }
  if ! $engine build "${build[@]}" "${ignore[@]}" -f "k8s/images/$kind.Dockerfile" -t "$image" .; then
    drop_left
    free=$(df -Pk "$storage" 2>/dev/null | awk 'NR==2 {printf "%.1f", $4 / 1048576}')
    echo "images: building $image failed ($free GiB free under $storage)" >&2
    exit 1
  fi
  echo "images: built $image in $(( $(date +%s) - start )) s" >&2
  drop_left
done
for kind in "${kinds[@]}"; do
  image="$registry/nvae-$kind:$tag"
  size=$($engine image inspect --format '{{.Size}}' "$image")
  echo "images: $image $(( size / 1000000 )) MB"
done
