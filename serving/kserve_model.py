"""The sampler as a KServe custom predictor: a `kserve.Model` served by `kserve.ModelServer` (Open Inference
Protocol v2 over REST and gRPC, KServe's health, readiness and metrics), for clusters that run KServe.

What is the sampler's own is shared with the built-in server (`serving.app`): the limits (`ServeConfig`),
request validation (`serving.protocol.parse_infer`), the noise and the onnxruntime runs (`OnnxSampler`),
request batching (`serving.batching.Batcher`) and the output encodings (`serving.protocol.encode_output`).
A bad input is `kserve.errors.InvalidInput`, which KServe answers with 400 over REST and INVALID_ARGUMENT
over gRPC.

What KServe's server does not offer, and where it is handled instead (see docs/deploy.md):
- bearer-token authentication of metadata: `predict` checks the token (KServe hands it the request headers
  or gRPC metadata), but KServe's own metadata routes answer without it; a mesh policy in front of the
  predictor (Istio AuthorizationPolicy) covers them where that matters;
- header and body deadlines for slow clients, and a body size limit: its uvicorn is configured by KServe
  (keep-alive 65 s, no header deadline); the queue-proxy / ingress in front of every KServe pod holds the
  slow connections instead;
- 429 on a full queue and 503 on a timeout come back as HTTP errors over REST.
`nvae serve` (the built-in server) keeps every limit itself, for Deployments without a mesh.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from serving.batching import Batcher, ServerMetrics
from serving.config import ServeConfig
from serving.onnx_sampler import OnnxSampler
from serving.protocol import BadRequest, InferRequest, bearer_ok, encode_output, parse_infer

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """A gRPC InferParameter (or a plain value) as a plain Python value."""
    if hasattr(value, "WhichOneof"):
        which = value.WhichOneof("parameter_choice")
        return getattr(value, which) if which else None
    return value


def request_as_json(payload) -> dict:
    """A kserve InferRequest (from REST or gRPC) in the JSON shape `parse_infer` validates."""
    inputs = []
    for inp in payload.inputs:
        data = inp.data
        if not isinstance(data, list):  # gRPC contents or raw bytes
            try:
                data = inp.as_numpy().ravel().tolist()
            except Exception as exc:  # noqa: BLE001 - whatever kserve cannot decode is the client's
                raise BadRequest(f"input {inp.name!r}: cannot read its data ({exc})") from None
        inputs.append({"name": inp.name, "datatype": inp.datatype, "shape": list(inp.shape), "data": data})
    params = {k: _plain(v) for k, v in (payload.parameters or {}).items()}
    request = {"inputs": inputs, "parameters": params, "id": payload.id}
    if payload.request_outputs:
        request["outputs"] = [{"name": o.name} for o in payload.request_outputs]
    return request


def make_model(
    onnx_path: str, cfg: ServeConfig, providers: str | None = "auto", allow_cpu_fallback: bool = False
):
    """The `kserve.Model` serving `onnx_path` under `cfg.model_name` with `cfg`'s request limits."""
    import kserve
    from fastapi import HTTPException
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferOutput, InferResponse

    cfg = cfg.validate()
    token = cfg.auth_token.encode() if cfg.auth_token else None

    class SamplerModel(kserve.Model):
        def __init__(self):
            super().__init__(cfg.model_name)
            self.sampler: OnnxSampler | None = None
            self.executor = ThreadPoolExecutor(
                max_workers=cfg.max_concurrency, thread_name_prefix="nvae-infer"
            )
            self.metrics = ServerMetrics()
            self.runs: set = set()
            self.batcher: Batcher | None = None

        def load(self) -> bool:
            self.sampler = OnnxSampler(
                onnx_path, providers, allow_cpu_fallback=allow_cpu_fallback, cache_dir=cfg.ort_cache_dir
            )
            self.batcher = Batcher(
                self.sampler,
                # always batching: KServe's server has no per-request path of its own to fall back on
                dataclasses.replace(cfg, batch_images=cfg.batch_images or cfg.max_images_per_request),
                self.executor,
                self.metrics,
                self.runs,
            )
            self.ready = True
            return self.ready

        def stop(self) -> None:
            for run_options in list(self.runs):
                run_options.terminate = True
            self.executor.shutdown(wait=False, cancel_futures=True)

        def get_input_types(self) -> list[dict]:
            return [
                {"name": "n", "datatype": "INT64", "shape": [1]},
                {"name": "temperature", "datatype": "FP32", "shape": [1]},
                {"name": "seed", "datatype": "INT64", "shape": [1]},
            ]

        def get_output_types(self) -> list[dict]:
            c, d = self.sampler.image_shape[0], self.sampler.image_shape[1]
            return [{"name": "images", "datatype": "UINT8", "shape": [-1, d, d, c]}]

        async def predict(self, payload, headers=None, response_headers=None):
            if token is not None:  # KServe passes the REST headers / gRPC metadata
                given = {k.lower(): v for k, v in (headers or {}).items()}.get("authorization", "")
                if not bearer_ok(given, token):
                    raise HTTPException(
                        401, "missing or invalid bearer token", {"WWW-Authenticate": "Bearer"}
                    )
            try:
                req: InferRequest = parse_infer(request_as_json(payload), cfg)
            except BadRequest as exc:
                raise InvalidInput(str(exc)) from None
            start = time.perf_counter()
            try:
                images, _ = await self.batcher.run(req, cfg.timeout_s)
            except BadRequest as exc:  # the queue is full
                raise HTTPException(exc.status, str(exc)) from None
            except TimeoutError:
                raise HTTPException(503, f"request timed out after {cfg.timeout_s} s") from None
            output = await asyncio.to_thread(encode_output, images, req.format)
            self.metrics.images.inc(req.n)
            self.metrics.images_per_second.set(req.n / max(time.perf_counter() - start, 1e-9))
            tensor = InferOutput(name="images", shape=output["shape"], datatype=output["datatype"])
            if output["datatype"] == "UINT8":
                tensor.set_data_from_numpy(
                    np.asarray(output["data"], np.uint8).reshape(output["shape"]), binary_data=False
                )
            else:
                tensor.data = output["data"]
                tensor.parameters = output["parameters"]
            from_grpc = bool(getattr(payload, "from_grpc", False))
            # kserve's gRPC encoder takes string, int and bool parameters only: the temperature goes as text there
            temperature = str(req.temperature) if from_grpc else req.temperature
            return InferResponse(
                response_id=req.id or str(uuid.uuid4()),
                model_name=cfg.model_name,
                infer_outputs=[tensor],
                from_grpc=from_grpc,
                parameters={"seed": req.seed, "temperature": temperature, "decode": self.sampler.decode},
            )

    return SamplerModel()


def serve_kserve(
    onnx_path: str,
    port: int,
    grpc_port: int | None,
    cfg: ServeConfig,
    providers: str | None = "auto",
    allow_cpu_fallback: bool = False,
) -> None:
    """Load the model and run kserve.ModelServer (REST on `port`, gRPC on `grpc_port` unless None) until
    SIGTERM; in-flight requests get `cfg.shutdown_timeout_s`."""
    import math

    import kserve

    model = make_model(onnx_path, cfg, providers, allow_cpu_fallback)
    model.load()
    log.info(
        "kserve model server: %r (registry version %s) on REST :%d, gRPC %s",
        cfg.model_name,
        model.sampler.registry_version or "none",
        port,
        grpc_port or "off",
    )
    kserve.ModelServer(
        http_port=port,
        grpc_port=grpc_port or 0,
        enable_grpc=grpc_port is not None,
        grace_period=max(1, math.ceil(cfg.shutdown_timeout_s)),
        workers=1,
    ).start([model])
