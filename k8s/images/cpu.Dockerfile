# syntax=docker/dockerfile:1.7
# ghcr.io/nvae-pipeline/nvae-cpu:0.1.0 (the name in k8s/images.yaml): the `nvae` CLI with PyTorch, DALI (CPU
# mode), onnxruntime, the sampler server and kfp (the pipeline's executor runs from the image; no pod installs
# anything). Build from the repository root with scripts/images.sh, or:
#   docker build -f k8s/images/cpu.Dockerfile -t ghcr.io/nvae-pipeline/nvae-cpu:0.1.0 .
# Every package comes from the hash-locked k8s/images/locks/cpu.txt (scripts/lock.sh), so a rebuild installs
# the same files. Its torch is PyPI's build, which carries CUDA's libraries (unused on CPU).
# Build arguments: BASE_IMAGE (a Debian 12 image with python3 3.11, the lock's target; scripts/images.sh
# --debian-base makes one from Debian packages where no registry is reachable), TORCH_REQUIREMENT (empty: the
# lock's torch; else a requirement line with its hash, e.g. `torch==2.13.0+cpu --hash=sha256:...` for a
# CPU-only wheel found through PIP_FIND_LINKS: a 2 GB image instead of 7 GB; the CUDA packages only the
# lock's torch needs are then left out), TORCHVISION_REQUIREMENT (with TORCH_REQUIREMENT: the torchvision built
# for that torch, as a line with its hash), PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS (local mirrors), WITH_COMPILER
# (1, the default: g++ and Python's headers in the image, so the training step's compiled CPU kernels run, about
# 9 % faster steps for about 450 MB, bench/RESULTS.md; 0: neither, the ATen paths run instead).
ARG BASE_IMAGE=python:3.11.13-slim-bookworm

# --- build: a virtual environment with the project and its runtime extras ------------------------------------
FROM ${BASE_IMAGE} AS build
ARG TORCH_REQUIREMENT=
ARG TORCHVISION_REQUIREMENT=
ARG PIP_EXTRA_INDEX_URL=
ARG PIP_FIND_LINKS=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# The dependencies first (a layer that outlives source changes): the build backend, then the whole lock, with
# sdists built against the locked backend (PEP 517, no isolation: nothing unlocked is fetched).
COPY k8s/images/lockfiles.py k8s/images/locks/cpu.txt ./lock/
RUN python3 lock/lockfiles.py prepare lock/cpu.txt lock --torch "${TORCH_REQUIREMENT}" \
      --torchvision "${TORCHVISION_REQUIREMENT}" \
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

# --- runtime: the environment only, as a non-root user -------------------------------------------------------
FROM ${BASE_IMAGE}
ARG WITH_COMPILER=1
LABEL org.opencontainers.image.ref.name="ghcr.io/nvae-pipeline/nvae-cpu:0.1.0" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.title="nvae-cpu" \
      org.opencontainers.image.source="https://github.com/nvae-pipeline/nvae-pipeline"
# The compiled CPU kernels (model/kernels.py) are built at run time by inductor, which needs a C++ compiler and the
# headers of the Python that runs it (python:*-slim has them; Debian's python3 needs python3.X-dev).
RUN if [ "$WITH_COMPILER" = 1 ]; then \
      headers=$(python3 -c "import os, sys, sysconfig; h = sysconfig.get_paths()['include']; \
print('' if os.path.exists(os.path.join(h, 'Python.h')) else 'python%d.%d-dev' % sys.version_info[:2])") \
   && apt-get update && apt-get install -y --no-install-recommends g++ $headers \
   && rm -rf /var/lib/apt/lists/*; \
    fi
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
