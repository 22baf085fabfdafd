# syntax=docker/dockerfile:1.7
# ghcr.io/nvae-pipeline/nvae-gpu:0.1.0 (the name in k8s/images.yaml): the `nvae` CLI with PyTorch's CUDA build,
# DALI for CUDA 13 (GPU decoding), onnxruntime-gpu and kfp. Build from the repository root with
# scripts/images.sh --gpu, or:
#   docker build -f k8s/images/gpu.Dockerfile -t ghcr.io/nvae-pipeline/nvae-gpu:0.1.0 .
# torch 2.14.1 (cu130), nvidia-dali-cuda130 and onnxruntime-gpu bring their CUDA libraries as wheels; the
# CUDA base image supplies the container setup the NVIDIA runtime expects (driver capabilities, compat).
# The host driver must support CUDA 13. Build arguments: BASE_IMAGE (any image with python3 and python3-venv
# installed, or the CUDA base, where they are installed here), PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS (local
# mirrors). Versions come from k8s/images/constraints.txt.
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
# The `onnx` extra is left out on purpose: it pulls the CPU `onnxruntime`, which must not be installed beside
# onnxruntime-gpu (which also provides the CPU provider). Its other packages are installed here, pinned.
RUN PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL}" PIP_FIND_LINKS="${PIP_FIND_LINKS}" \
    pip install -c constraints.txt ".[data,train,serve,pipeline]" \
      onnx==1.23.2 onnxscript==0.7.2 "onnxruntime-gpu[cuda,cudnn]==1.31.1" \
 && python -c "import kfp, torch, nvidia.dali, onnxruntime, cli.main"

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
