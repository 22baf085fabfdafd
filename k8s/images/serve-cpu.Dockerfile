# syntax=docker/dockerfile:1.7
# ghcr.io/nvae-pipeline/nvae-serve-cpu:0.1.0: the ONNX sampler alone (`python -m serving`, the same command as
# `nvae serve`): onnxruntime, numpy, the HTTP server; no torch, DALI or DVC. Holds the `serving` and `common`
# packages only. Build from the repository root with `scripts/images.sh --serve`, or:
#   docker build -f k8s/images/serve-cpu.Dockerfile -t ghcr.io/nvae-pipeline/nvae-serve-cpu:0.1.0 .
ARG BASE_IMAGE=python:3.11.13-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Every package from the hash-locked k8s/images/locks/serve-cpu.txt (scripts/lock.sh).
COPY k8s/images/lockfiles.py k8s/images/locks/serve-cpu.txt /tmp/lock/
RUN python3 /tmp/lock/lockfiles.py prepare /tmp/lock/serve-cpu.txt /tmp/lock \
 && export PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL}" PIP_FIND_LINKS="${PIP_FIND_LINKS}" \
 && pip install --require-hashes --no-deps -r /tmp/lock/build.txt \
 && pip install --require-hashes --no-deps --no-build-isolation --use-pep517 -r /tmp/lock/runtime.txt \
 && pip check
COPY common /opt/app/common
COPY serving /opt/app/serving
RUN cd /opt/app && python -c "import serving.server, serving.onnx_sampler; import sys; assert 'torch' not in sys.modules"

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.ref.name="ghcr.io/nvae-pipeline/nvae-serve-cpu:0.1.0" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.title="nvae-serve-cpu" \
      org.opencontainers.image.source="https://github.com/nvae-pipeline/nvae-pipeline"
RUN groupadd --gid 10001 nvae && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp nvae
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/app /opt/app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/app \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["python", "-m", "serving"]
CMD ["--onnx", "/models/decoder.onnx", "--host", "0.0.0.0", "--port", "8080"]
