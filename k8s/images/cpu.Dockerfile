# syntax=docker/dockerfile:1.7
# ghcr.io/nvae-pipeline/nvae-cpu:0.1.0 (the name in k8s/images.yaml): the `nvae` CLI with PyTorch's CPU build,
# DALI (CPU mode), onnxruntime, the sampler server and kfp (the pipeline's executor runs from the image; no
# pod installs anything). Build from the repository root with scripts/images.sh, or:
#   docker build -f k8s/images/cpu.Dockerfile -t ghcr.io/nvae-pipeline/nvae-cpu:0.1.0 .
# Build arguments: BASE_IMAGE (a Debian 12 image with python3 3.11; scripts/images.sh --debian-base makes one
# from Debian packages where no registry is reachable), TORCH_INDEX_URL (PyTorch's CPU wheel index; empty:
# PyPI's torch, the CUDA build: larger, same API), TORCH_VERSION (empty: the constraints' pin; e.g. 2.13.0+cpu,
# a CPU build in a local find-links folder), PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS (local mirrors).
# Versions come from k8s/images/constraints.txt, so a rebuild resolves the same set.
ARG BASE_IMAGE=python:3.11.13-slim-bookworm

# --- build: a virtual environment with the project and its runtime extras ------------------------------------
FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY k8s/images/constraints.txt ./constraints.txt
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
RUN if [ -n "${TORCH_VERSION}" ]; then sed -i "s/^torch==.*/torch==${TORCH_VERSION}/" constraints.txt; fi \
 && PIP_EXTRA_INDEX_URL="${TORCH_INDEX_URL} ${PIP_EXTRA_INDEX_URL}" PIP_FIND_LINKS="${PIP_FIND_LINKS}" \
    pip install -c constraints.txt ".[data,train,onnx,serve,pipeline]" \
 && python -c "import kfp, torch, nvidia.dali, onnxruntime, cli.main"

# --- runtime: the environment only, as a non-root user -------------------------------------------------------
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.ref.name="ghcr.io/nvae-pipeline/nvae-cpu:0.1.0" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.title="nvae-cpu" \
      org.opencontainers.image.source="https://github.com/nvae-pipeline/nvae-pipeline"
RUN groupadd --gid 10001 nvae && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp nvae
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080
CMD ["nvae", "--help"]
