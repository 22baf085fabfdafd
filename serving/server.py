"""`serve`: the built-in sampling server put together, the sampler behind the app on the guarded transport.

`python -m serving` (and `nvae serve`, which delegates to it) calls `serve`. The parts, each in a module of
its own job: `serving.config` (the limits), `serving.protocol` (request parsing, response encoding),
`serving.batching` (request batching, metrics), `serving.app` (the FastAPI app) and `serving.transport`
(uvicorn with deadlines).
"""

from __future__ import annotations

import logging

from serving.app import create_app
from serving.config import ServeConfig
from serving.onnx_sampler import OnnxSampler
from serving.transport import uvicorn_config

__all__ = ["serve"]

log = logging.getLogger(__name__)


def serve(
    onnx_path: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    cfg: ServeConfig | None = None,
    providers: str | None = "auto",
    allow_cpu_fallback: bool = False,
) -> None:
    """Load the sampler and serve it with uvicorn until SIGTERM/SIGINT. With providers="cuda", a CUDA
    provider that does not load stops here (the pod never turns ready) unless `allow_cpu_fallback`."""
    import uvicorn

    cfg = (cfg or ServeConfig()).validate()
    sampler = OnnxSampler(
        onnx_path, providers, allow_cpu_fallback=allow_cpu_fallback, cache_dir=cfg.ort_cache_dir
    )
    app = create_app(sampler, cfg)
    log.info(
        "serving %s (registry version %s) as %r on http://%s:%d (providers %s, authentication %s)",
        onnx_path,
        sampler.registry_version or "none: not pulled from a registry",
        cfg.model_name,
        host,
        port,
        sampler.providers,
        "on" if cfg.auth_token else "off",
    )
    uvicorn.Server(uvicorn_config(app, cfg, host=host, port=port, log_level="info")).run()
