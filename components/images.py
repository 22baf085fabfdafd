"""The container images the components run in: the one place their registry, names and tag are set.

The committed spec (`pipelines/nvae_pipeline.yaml`), k8s/images.yaml and the Dockerfiles' labels use the
defaults; `nvae pipeline compile|run|submit --image-registry R --image-tag T` points a run at the registry the
images were pushed to (`scripts/images.sh --registry R --tag T` builds them under those names), and
`--image-digest cpu=sha256:...` pins an image to the digest it was pushed with (a release's spec does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.errors import ConfigError

DEFAULT_REGISTRY = "ghcr.io/nvae-pipeline"
DEFAULT_TAG = "0.1.0"  # the project version
NAMES = {"cpu": "nvae-cpu", "gpu": "nvae-gpu"}

# A registry host[:port] with an optional path (no scheme); a tag as Docker defines it.
_REGISTRY = re.compile(r"[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True)
class Images:
    """`registry/nvae-cpu:tag` and `registry/nvae-gpu:tag`, each `...@sha256:...` where `digests` pins it."""

    registry: str = DEFAULT_REGISTRY
    tag: str = DEFAULT_TAG
    digests: tuple[tuple[str, str], ...] = ()  # (kind, "sha256:<64 hex>") pairs

    def __post_init__(self):
        if not _REGISTRY.fullmatch(self.registry):
            raise ConfigError(
                f"image registry {self.registry!r} is not a registry path such as "
                "ghcr.io/org or localhost:5000/nvae (lower case, no scheme, no tag)"
            )
        if not _TAG.fullmatch(self.tag):
            raise ConfigError(f"image tag {self.tag!r}: letters, digits, '_', '.', '-' (at most 128)")
        for kind, digest in self.digests:
            if kind not in NAMES:
                raise ConfigError(f"image digest for {kind!r}: the images are {', '.join(NAMES)}")
            if not _DIGEST.fullmatch(digest):
                raise ConfigError(f"image digest {digest!r} for {kind}: sha256:<64 lower-case hex digits>")

    def ref(self, kind: str) -> str:
        pinned = dict(self.digests).get(kind)
        return f"{self.registry}/{NAMES[kind]}:{self.tag}" + (f"@{pinned}" if pinned else "")

    @property
    def cpu(self) -> str:
        return self.ref("cpu")

    @property
    def gpu(self) -> str:
        return self.ref("gpu")


DEFAULT_IMAGES = Images()
CPU_IMAGE = DEFAULT_IMAGES.cpu
GPU_IMAGE = DEFAULT_IMAGES.gpu
