"""The limits of the sampling service (`ServeConfig`), shared by both servers.

Every field is a flag of `nvae serve` / `python -m serving`. The request parser, the batcher, the app and the
transport each read the fields of their job from one `ServeConfig`, which `validate` checks once at start
(ConfigError naming the field), so a bad limit stops the server before it listens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.errors import ConfigError


@dataclass
class ServeConfig:
    """Limits of the service; every one is a CLI flag of `nvae serve`."""

    model_name: str = "nvae-decoder"
    max_images_per_request: int = 256
    max_batch: int = 64  # images per onnxruntime run
    timeout_s: float = 30.0  # per request, queueing included
    max_concurrency: int = 1  # requests sampling at once (each already uses every core)
    max_queue: int = 16  # requests waiting for a slot before 429
    max_temperature: float = 10.0
    max_body_bytes: int = 64 * 1024
    # Request batching (off when batch_images is 0): requests of one temperature that wait together run as
    # one onnxruntime call of up to batch_images images; an idle server waits batch_wait_s for company.
    batch_images: int = 0
    batch_wait_s: float = 0.0
    max_json_depth: int = 8  # a valid request nests 4 deep: {"inputs": [{"data": [..]}]}
    auth_token: str | None = None  # bearer token for inference and metadata; None: no authentication
    header_timeout_s: float = 10.0  # from connection (or the previous response) to complete headers
    body_timeout_s: float = 10.0  # from headers to the whole body
    shutdown_timeout_s: float = 10.0  # in-flight requests' grace on SIGTERM
    ort_cache_dir: str | None = None  # where the optimised graph is cached between starts; None: no cache

    def validate(self) -> ServeConfig:
        """Check every limit; ConfigError naming the field and its allowed range. Returns self."""
        for name in (
            "max_images_per_request",
            "max_batch",
            "max_concurrency",
            "max_body_bytes",
            "max_json_depth",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_queue < 0:
            raise ConfigError(f"max_queue={self.max_queue} must be >= 0")
        if self.batch_images < 0 or not 0 <= self.batch_wait_s <= 1:
            raise ConfigError("batch_images must be >= 0 and batch_wait_s in [0, 1]")
        for name in (
            "timeout_s",
            "max_temperature",
            "header_timeout_s",
            "body_timeout_s",
            "shutdown_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be > 0")
        if self.auth_token is not None and not re.fullmatch(r"[\x21-\x7e]{16,4096}", self.auth_token):
            raise ConfigError("the bearer token must be 16 to 4096 printable ASCII characters without spaces")
        if not self.model_name or "/" in self.model_name:
            raise ConfigError(f"model_name={self.model_name!r} must be non-empty without '/'")
        return self
