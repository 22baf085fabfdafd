# syntax=docker/dockerfile:1.7
# ghcr.io/nvae-pipeline/nvae-cpu:0.1.0 (the name in k8s/images.yaml): the `nvae` CLI with PyTorch's CPU build,
# DALI (CPU mode), onnxruntime and the sampler server. Build from the repository root:
#   docker build -f k8s/images/cpu.Dockerfile -t ghcr.io/nvae-pipeline/nvae-cpu:0.1.0 .

# --- build: a virtual environment with the project and its runtime extras ------------------------------------
FROM python:3.11.13-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# PyPI's Linux torch is the CUDA build (GBs of CUDA libraries); the CPU image takes the CPU build, same version.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1
WORKDIR /src
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
RUN pip install ".[data,train,onnx,serve]"

# --- runtime: the environment only, as a non-root user -------------------------------------------------------
FROM python:3.11.13-slim-bookworm
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
