# syntax=docker/dockerfile:1.7
# ghcr.io/nvae-pipeline/nvae-gpu:0.1.0 (the name in k8s/images.yaml): the `nvae` CLI with PyTorch's CUDA build,
# DALI for CUDA 13 (GPU decoding), onnxruntime-gpu and kfp. Build from the repository root with
# scripts/images.sh --gpu, or:
#   docker build -f k8s/images/gpu.Dockerfile -t ghcr.io/nvae-pipeline/nvae-gpu:0.1.0 .
# Every package comes from the hash-locked k8s/images/locks/gpu.txt (scripts/lock.sh): torch 2.14.1,
# nvidia-dali-cuda130 and onnxruntime-gpu (in place of onnxruntime: never both) bring CUDA 13's libraries as
# wheels, one set for all three (the lock's header names the major). The CUDA base image supplies the container
# setup the NVIDIA runtime expects (driver capabilities, compat); the host driver must support CUDA 13.
# Build arguments: BASE_IMAGE (an image whose python3 is 3.12, the lock's target, with python3-venv, or the
# CUDA base, where they are installed here), PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS (local mirrors).
ARG BASE_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04

# --- build ---------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN command -v python3 >/dev/null && python3 -c "import venv, ensurepip" 2>/dev/null \
 || (apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
     && rm -rf /var/lib/apt/lists/*)
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The dependencies first (a layer that outlives source changes): the build backend, then the whole lock, with
# sdists built against the locked backend (PEP 517, no isolation: nothing unlocked is fetched).
COPY k8s/images/lockfiles.py k8s/images/locks/gpu.txt ./lock/
RUN python3 lock/lockfiles.py prepare lock/gpu.txt lock \
 && export PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL}" PIP_FIND_LINKS="${PIP_FIND_LINKS}" \
 && pip install --require-hashes --no-deps -r lock/build.txt \
 && pip install --require-hashes --no-deps --no-build-isolation --use-pep517 -r lock/runtime.txt \
 && pip check
COPY pyproject.toml README.md ./
COPY common ./common
COPY model ./model
COPY data ./data
COPY training ./training
COPY inference ./inference
COPY serving ./serving
COPY cli ./cli
COPY components ./components
COPY pipelines ./pipelines
RUN pip install --no-deps --no-build-isolation . \
 && cd /tmp && python -c "import kfp, torch, nvidia.dali, onnxruntime, pytorch_fid, scipy, lmdb, cli.main"

# --- runtime -------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.ref.name="ghcr.io/nvae-pipeline/nvae-gpu:0.1.0" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.title="nvae-gpu" \
      org.opencontainers.image.source="https://github.com/nvae-pipeline/nvae-pipeline"
ENV DEBIAN_FRONTEND=noninteractive
RUN command -v python3 >/dev/null \
 || (apt-get update && apt-get install -y --no-install-recommends python3 && rm -rf /var/lib/apt/lists/*)
RUN groupadd --gid 10001 nvae && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp nvae
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080
CMD ["nvae", "--help"]
