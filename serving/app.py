"""The built-in sampling service as a FastAPI app: the Open Inference Protocol v2 endpoints over one sampler.

Endpoints: `GET /v2/health/live`, `/v2/health/ready`, `/v2`, `/v2/models/<name>`, `/v2/models/<name>/ready`,
`POST /v2/models/<name>/infer` (also under `/versions/1/`), and `GET /metrics` (Prometheus). Request and
response bodies are `serving.protocol`'s; the network side (header deadline, bounded shutdown) is
`serving.transport`'s.

Errors are `{"error": "<message>"}`: 400 for an input `serving.protocol` refuses, 401 without the bearer
token when `auth_token` is set, 404 for another model name, 408 for a body that does not arrive within
`body_timeout_s`, 413 for a body above `max_body_bytes`, 429 when `max_concurrency` runs and `max_queue`
waiters are all taken, 503 when a request passes its timeout, 500 for a bug (logged, counted, never the
traceback). A client that goes away before its body has arrived gets nothing (it is gone) and is counted as
499, nginx's "client closed request", with one log line. Every answer is counted in /metrics by endpoint and
code.

Authentication (optional): with `auth_token` set, inference and metadata need `Authorization: Bearer
<token>` (compared in constant time); health, readiness and /metrics stay open for probes and scrapers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the handlers' string annotations here

from serving.batching import Batcher, ServerMetrics
from serving.config import ServeConfig
from serving.onnx_sampler import OnnxSampler
from serving.protocol import (
    FORMATS,
    BadRequest,
    InferRequest,
    bearer_ok,
    decode_json,
    encode_output,
    parse_infer,
)

log = logging.getLogger(__name__)

CLIENT_CLOSED_REQUEST = 499  # nginx's code for a client that closed the connection before the answer

# Open without a token: liveness, readiness (server and model) and the Prometheus scrape.
OPEN_PATHS = re.compile(r"/v2/health/(live|ready)|/v2/models/[^/]+(/versions/[^/]+)?/ready|/metrics")


def create_app(sampler: OnnxSampler, cfg: ServeConfig | None = None):
    """The FastAPI app serving `sampler` under `cfg.model_name`."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    cfg = (cfg or ServeConfig()).validate()
    executor = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="nvae-infer")
    runs: set = set()  # RunOptions of the onnxruntime runs in flight

    def stop() -> None:
        """Stop every run still going (onnxruntime checks `terminate` between nodes) and drop queued work,
        so the process exits at once after the server's grace period."""
        for run_options in list(runs):
            run_options.terminate = True
        executor.shutdown(wait=False, cancel_futures=True)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        stop()  # uvicorn gets here after `timeout_graceful_shutdown`

    app = FastAPI(title="nvae-serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    metrics = ServerMetrics()
    slots = asyncio.Semaphore(cfg.max_concurrency)
    state = {"waiting": 0, "ready": True}
    batcher = Batcher(sampler, cfg, executor, metrics, runs) if cfg.batch_images else None
    app.state.batcher = batcher
    app.state.metrics, app.state.config, app.state.sampler = metrics, cfg, sampler
    c, d = sampler.image_shape[0], sampler.image_shape[1]

    def error(message: str, status: int) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    token = cfg.auth_token.encode() if cfg.auth_token else None

    @app.middleware("http")
    async def authenticate(request: Request, call_next):  # inner: runs after `count` started its clock
        if token is not None and not OPEN_PATHS.fullmatch(request.url.path):
            if not bearer_ok(request.headers.get("authorization", ""), token):
                return JSONResponse(
                    {"error": "missing or invalid bearer token (Authorization: Bearer <token>)"},
                    status_code=401,
                    headers={"WWW-Authenticate": 'Bearer realm="nvae-serve"'},
                )
        return await call_next(request)

    @app.middleware("http")
    async def count(request: Request, call_next):  # outer: sees every answer, 500s included
        from starlette.requests import ClientDisconnect

        start = time.perf_counter()
        try:
            response = await call_next(request)
        except ClientDisconnect:  # the client went away mid-body: its fault, not ours, and nobody to answer
            log.info("%s %s: the client disconnected before its body arrived", request.method, request.url.path)
            response = Response(status_code=CLIENT_CLOSED_REQUEST)
        except Exception:  # noqa: BLE001 - a bug: log it, count it, answer without the traceback
            log.exception("%s %s failed", request.method, request.url.path)
            response = error("internal error (logged by the server)", 500)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "other")
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        return response

    def check_model(name: str, version: str | None = None) -> JSONResponse | None:
        if name != cfg.model_name:
            return error(f"unknown model {name!r}; this server serves {cfg.model_name!r}", 404)
        if version is not None and version != "1":
            return error(f"unknown version {version!r} of {name!r}; versions: 1", 404)
        return None

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.get("/v2")
    async def server_metadata():
        return {"name": "nvae-serve", "version": "1", "extensions": []}

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None):
        if (bad := check_model(name, version)) is not None:
            return bad
        return {
            "name": cfg.model_name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [
                {"name": "n", "datatype": "INT64", "shape": [1]},
                {"name": "temperature", "datatype": "FP32", "shape": [1]},
                {"name": "seed", "datatype": "INT64", "shape": [1], "parameters": {"optional": True}},
            ],
            "outputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, d, d, c]}],
            "parameters": {
                "providers": sampler.providers,
                "decode": sampler.decode,
                "preset": sampler.metadata.get("nvae.preset", ""),
                "bn_readjust_temperature": sampler.metadata.get("nvae.bn_readjust_temperature", ""),
                "checkpoint_sha256": sampler.metadata.get("nvae.checkpoint_sha256", ""),
                "registry_version": getattr(sampler, "registry_version", None) or "",
                "max_images_per_request": cfg.max_images_per_request,
                "formats": list(FORMATS),
            },
        }

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None):
        if (bad := check_model(name, version)) is not None:
            return bad
        return JSONResponse(
            {"name": name, "ready": state["ready"]}, status_code=200 if state["ready"] else 503
        )

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cfg.max_body_bytes):
            raise BadRequest(f"request body above {cfg.max_body_bytes} bytes", 413)
        chunks, size = [], 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > cfg.max_body_bytes:
                    raise BadRequest(f"request body above {cfg.max_body_bytes} bytes", 413)
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), timeout=cfg.body_timeout_s)
        except TimeoutError:
            raise BadRequest(f"request body not received within {cfg.body_timeout_s} s", 408) from None
        return b"".join(chunks)

    def run_sampler(req: InferRequest, run_options) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        images = sampler.sample(req.n, req.temperature, req.seed, cfg.max_batch, run_options=run_options)
        return images, time.perf_counter() - start

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str | None = None):
        import onnxruntime as ort

        if (bad := check_model(name, version)) is not None:
            return bad
        deadline = time.perf_counter() + cfg.timeout_s
        try:
            req = parse_infer(decode_json(await read_body(request), cfg.max_json_depth), cfg)
        except BadRequest as exc:
            response = error(str(exc), exc.status)
            if exc.status in (408, 413):  # the rest of the body may still be on its way: do not read it
                response.headers["Connection"] = "close"
            return response

        if batcher is not None:
            return await infer_batched(req, deadline)
        if slots.locked() and state["waiting"] >= cfg.max_queue:
            return error(f"server busy: {cfg.max_concurrency} running and {cfg.max_queue} waiting", 429)
        run_options = ort.RunOptions()
        runs.add(run_options)
        state["waiting"] += 1
        metrics.waiting.set(state["waiting"])
        acquired = False
        try:
            try:
                await asyncio.wait_for(slots.acquire(), timeout=max(0.0, deadline - time.perf_counter()))
                acquired = True
            finally:
                state["waiting"] -= 1
                metrics.waiting.set(state["waiting"])
            metrics.in_flight.inc()
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(executor, run_sampler, req, run_options)
            try:
                images, seconds = await asyncio.wait_for(
                    asyncio.shield(future), timeout=max(0.0, deadline - time.perf_counter())
                )
            except TimeoutError:
                run_options.terminate = True  # stops onnxruntime mid-run; the slot frees when it returns
                with contextlib.suppress(Exception):  # the stopped run's own error is expected
                    await future
                raise
        except TimeoutError:
            return error(f"request timed out after {cfg.timeout_s} s", 503)
        finally:
            runs.discard(run_options)
            if acquired:
                metrics.in_flight.dec()
                slots.release()
        return await respond(req, images, seconds)

    async def infer_batched(req: InferRequest, deadline: float):
        try:
            images, seconds = await batcher.run(req, deadline - time.perf_counter())
        except BadRequest as exc:
            return error(str(exc), exc.status)
        except TimeoutError:
            return error(f"request timed out after {cfg.timeout_s} s", 503)
        return await respond(req, images, seconds)

    async def respond(req: InferRequest, images: np.ndarray, seconds: float):
        metrics.images.inc(req.n)
        metrics.images_per_second.set(req.n / max(seconds, 1e-9))
        output = await asyncio.to_thread(encode_output, images, req.format)
        response = {
            "model_name": cfg.model_name,
            "model_version": "1",
            "parameters": {"seed": req.seed, "temperature": req.temperature, "decode": sampler.decode},
            "outputs": [output],
        }
        if req.id is not None:
            response["id"] = req.id
        return JSONResponse(response)

    app.state.shutdown = stop
    return app
