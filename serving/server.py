"""HTTP sampling service speaking the Open Inference Protocol v2 (KServe / Triton clients), FastAPI + uvicorn.

Endpoints: `GET /v2/health/live`, `/v2/health/ready`, `/v2`, `/v2/models/<name>`, `/v2/models/<name>/ready`,
`POST /v2/models/<name>/infer` (also under `/versions/1/`), and `GET /metrics` (Prometheus).

Infer request (JSON):

    {"inputs": [{"name": "n",           "datatype": "INT64", "shape": [1], "data": [16]},
                {"name": "temperature", "datatype": "FP32",  "shape": [1], "data": [0.7]},
                {"name": "seed",        "datatype": "INT64", "shape": [1], "data": [0]}],   # seed optional
     "parameters": {"format": "uint8"}}                                                 # optional

`format`: "uint8" (default) answers output `images`, UINT8 (n, H, W, C), row-major flat `data`;
"png" answers `images` as BYTES (n,): one base64-encoded PNG per image; "png_grid" answers `images` as
BYTES (1,): one base64 PNG of all images tiled. The response `parameters` carry the seed used (a random
one when none was given), the temperature and the decode mode, so any answer can be reproduced.

Errors are `{"error": "<message>"}`: 400 for malformed, negative, non-finite or out-of-range inputs (n above
the per-request maximum included; JSON nested deeper than `max_json_depth` or with integers of more than 20
digits), 401 without the bearer token when `auth_token` is set, 404 for another model name, 408 for a body
that does not arrive within `body_timeout_s`, 413 for a body above `max_body_bytes`, 429 when
`max_concurrency` runs and `max_queue` waiters are all taken, 503 when a request passes its timeout, 500 for
a bug (logged, counted, never the traceback). Every answer is counted in /metrics by endpoint and code.

Authentication (optional): with `auth_token` set, inference and metadata need `Authorization: Bearer
<token>` (compared in constant time); health, readiness and /metrics stay open for probes and scrapers.

Slow clients: a connection must deliver a request's headers within `header_timeout_s` and its body within
`body_timeout_s`, or it is dropped (headers) or answered 408 (body). On SIGTERM the server stops accepting,
lets in-flight requests finish for up to `shutdown_timeout_s`, then stops the runs still going and exits.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hmac
import io
import json
import logging
import math
import re
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the handlers' string annotations here

from serving.onnx_sampler import MAX_SEED, OnnxSampler

log = logging.getLogger(__name__)

INT_TYPES = ("INT64", "INT32", "INT16", "INT8", "UINT64", "UINT32", "UINT16", "UINT8")
FLOAT_TYPES = ("FP32", "FP64", "FP16")
FORMATS = ("uint8", "png", "png_grid")
# Open without a token: liveness, readiness (server and model) and the Prometheus scrape.
OPEN_PATHS = re.compile(r"/v2/health/(live|ready)|/v2/models/[^/]+(/versions/[^/]+)?/ready|/metrics")


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
        for name in (
            "max_images_per_request",
            "max_batch",
            "max_concurrency",
            "max_body_bytes",
            "max_json_depth",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_queue < 0:
            raise ValueError(f"max_queue={self.max_queue} must be >= 0")
        if self.batch_images < 0 or not 0 <= self.batch_wait_s <= 1:
            raise ValueError("batch_images must be >= 0 and batch_wait_s in [0, 1]")
        for name in (
            "timeout_s",
            "max_temperature",
            "header_timeout_s",
            "body_timeout_s",
            "shutdown_timeout_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.auth_token is not None and not re.fullmatch(r"[\x21-\x7e]{16,4096}", self.auth_token):
            raise ValueError("the bearer token must be 16 to 4096 printable ASCII characters without spaces")
        if not self.model_name or "/" in self.model_name:
            raise ValueError(f"model_name={self.model_name!r} must be non-empty without '/'")
        return self


class BadRequest(Exception):
    """An input the client must fix: answered with `status` (4xx) and the message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def bearer_ok(authorization: str, token: bytes) -> bool:
    """Whether an `Authorization` header value is `Bearer <token>` (compared in constant time)."""
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)


# --------------------------------------------------------------------------- request parsing
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')
MAX_INT_DIGITS = 20  # 2**63 - 1 has 19


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BadRequest(f"integer with {len(text)} digits; at most {MAX_INT_DIGITS} are accepted")
    return int(text)


def _no_constant(name: str):
    raise BadRequest(f"{name} is not valid JSON")


def decode_json(raw: bytes, max_depth: int) -> Any:
    """json.loads with limits: nesting at most `max_depth` (checked before parsing, so a 5000-deep array
    cannot exhaust the recursion limit), integers of at most 20 digits, no NaN/Infinity; BadRequest else."""
    depth = 0
    for match in _JSON_TOKENS.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                raise BadRequest(f"JSON nested deeper than {max_depth} levels")
        elif token in (b"]", b"}"):
            depth -= 1
    try:
        return json.loads(raw, parse_int=_bounded_int, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(f"body is not valid JSON: {exc}") from None


@dataclass
class InferRequest:
    n: int
    temperature: float
    seed: int
    seed_given: bool
    format: str
    id: str | None


def _scalar(inp: dict[str, Any], types: tuple[str, ...]) -> Any:
    name = inp["name"]
    datatype = inp.get("datatype")
    if datatype not in types:
        raise BadRequest(f"input {name!r}: datatype {datatype!r}; expected {types[0]}")
    shape = inp.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise BadRequest(f"input {name!r}: shape must be a list of integers, e.g. [1]")
    if any(d != 1 for d in shape):  # [-1, -1] multiplies to 1 too
        raise BadRequest(f"input {name!r}: shape {shape} must hold exactly one element, e.g. [1]")
    data = inp.get("data")
    while isinstance(data, list) and len(data) == 1 and isinstance(data[0], list):
        data = data[0]
    if not isinstance(data, list) or len(data) != 1:
        raise BadRequest(f"input {name!r}: data must be a list with one value, e.g. [1]")
    value = data[0]
    if types is INT_TYPES:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"input {name!r}: {value!r} is not an integer")
    else:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRequest(f"input {name!r}: {value!r} is not a number")
        if not math.isfinite(value):
            raise BadRequest(f"input {name!r}: {value!r} is not finite")
    return value


def parse_infer(body: Any, cfg: ServeConfig) -> InferRequest:
    """Validate an OIP v2 infer request body (already JSON-decoded); BadRequest names the field."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object with an 'inputs' list")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty list")
    by_name: dict[str, dict] = {}
    for inp in inputs:
        if not isinstance(inp, dict) or not isinstance(inp.get("name"), str):
            raise BadRequest("every input must be an object with a 'name'")
        if inp["name"] not in ("n", "temperature", "seed"):
            raise BadRequest(f"unknown input {inp['name']!r}; inputs are n, temperature, seed")
        if inp["name"] in by_name:
            raise BadRequest(f"input {inp['name']!r} given twice")
        by_name[inp["name"]] = inp
    for required in ("n", "temperature"):
        if required not in by_name:
            raise BadRequest(f"missing input {required!r}")
    n = _scalar(by_name["n"], INT_TYPES)
    if not 1 <= n <= cfg.max_images_per_request:
        raise BadRequest(f"n={n} is out of range; allowed 1 <= n <= {cfg.max_images_per_request}")
    temperature = float(_scalar(by_name["temperature"], FLOAT_TYPES))
    if not 0 < temperature <= cfg.max_temperature:
        raise BadRequest(f"temperature={temperature} is out of range; allowed 0 < t <= {cfg.max_temperature}")
    seed_given = "seed" in by_name
    seed = _scalar(by_name["seed"], INT_TYPES) if seed_given else secrets.randbelow(2**31)
    if not 0 <= seed <= MAX_SEED:
        raise BadRequest(f"seed={seed} is out of range; allowed 0 <= seed <= 2**63 - 1")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be an object")
    fmt = params.get("format", "uint8")
    if fmt not in FORMATS:
        raise BadRequest(f"parameter format={fmt!r}; choose one of: {', '.join(FORMATS)}")
    outputs = body.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or any(
            not isinstance(o, dict) or o.get("name") != "images" for o in outputs
        ):
            raise BadRequest("'outputs' may only request the output 'images'")
    req_id = body.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise BadRequest("'id' must be a string")
    return InferRequest(n, temperature, int(seed), seed_given, fmt, req_id)


# --------------------------------------------------------------------------- response encoding
def to_uint8_nhwc(images: np.ndarray) -> np.ndarray:
    """(B, C, H, W) float in [0, 1] -> (B, H, W, C) uint8 (round half up, like `image_grid`)."""
    return (np.clip(images, 0, 1).transpose(0, 2, 3, 1) * 255 + 0.5).astype(np.uint8)


def tile(arr: np.ndarray, pad: int = 2) -> np.ndarray:
    """(B, H, W, C) uint8 -> one (H', W', C) grid, ceil(sqrt(B)) images a row, `pad` white pixels between
    (the layout of the training and `nvae sample` grids)."""
    b, h, w, c = arr.shape
    cols = max(1, math.ceil(math.sqrt(b)))
    rows = math.ceil(b / cols)
    cells = np.full((rows * cols, h + pad, w + pad, c), 255, dtype=np.uint8)
    cells[:b, :h, :w] = arr
    grid = cells.reshape(rows, cols, h + pad, w + pad, c).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * (h + pad), cols * (w + pad), c)
    return np.pad(grid, ((pad, 0), (pad, 0), (0, 0)), constant_values=255)


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


def encode_output(images: np.ndarray, fmt: str) -> dict[str, Any]:
    """The OIP output tensor `images` for float images (B, C, H, W) in [0, 1]."""
    arr = to_uint8_nhwc(images)
    if fmt == "uint8":
        return {"name": "images", "datatype": "UINT8", "shape": list(arr.shape), "data": arr.ravel().tolist()}
    if fmt == "png":
        data = [base64.b64encode(png_bytes(a)).decode("ascii") for a in arr]
        return {
            "name": "images",
            "datatype": "BYTES",
            "shape": [len(data)],
            "data": data,
            "parameters": {"content_type": "image/png", "encoding": "base64"},
        }
    grid = tile(arr)
    return {
        "name": "images",
        "datatype": "BYTES",
        "shape": [1],
        "data": [base64.b64encode(png_bytes(grid)).decode("ascii")],
        "parameters": {"content_type": "image/png", "encoding": "base64"},
    }


# --------------------------------------------------------------------------- request batching
class Batcher:
    """Gathers waiting infer requests into shared runs: up to `max_concurrency` runs at once, each taking the
    oldest request and every later one of the same temperature while the images fit in `batch_images`."""

    def __init__(self, sampler: OnnxSampler, cfg: ServeConfig, executor: ThreadPoolExecutor, metrics, runs):
        self.sampler, self.cfg, self.executor, self.metrics = sampler, cfg, executor, metrics
        self.active = runs  # the app's set of RunOptions in flight (stopped on shutdown)
        self.queue: list[tuple[InferRequest, asyncio.Future]] = []
        self.pumps = 0
        self.runs = 0  # onnxruntime calls made, for tests and the log

    def submit(self, req: InferRequest) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.queue.append((req, future))
        self.metrics.waiting.set(len(self.queue))
        if self.pumps < self.cfg.max_concurrency:
            self.pumps += 1
            asyncio.get_running_loop().create_task(self._pump())
        return future

    async def run(self, req: InferRequest, timeout: float) -> tuple[np.ndarray, float]:
        """One request through the queue: (images, seconds of its run). BadRequest(429) when every slot
        and the queue are taken; TimeoutError (the request withdrawn) after `timeout` seconds."""
        if self.pumps >= self.cfg.max_concurrency and len(self.queue) >= self.cfg.max_queue:
            raise BadRequest(
                f"server busy: {self.cfg.max_concurrency} running and {self.cfg.max_queue} waiting", 429
            )
        future = self.submit(req)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=max(0.0, timeout))
        except TimeoutError:
            self.withdraw(future)
            raise

    def withdraw(self, future: asyncio.Future) -> None:
        """A request that gave up (timeout) leaves the queue, or its share of a run is thrown away."""
        self.queue = [(r, f) for r, f in self.queue if f is not future]
        self.metrics.waiting.set(len(self.queue))

    def _take(self) -> list[tuple[InferRequest, asyncio.Future]]:
        first = self.queue[0][0]
        group, images, rest = [], 0, []
        for req, fut in self.queue:
            fits = not group or images + req.n <= self.cfg.batch_images
            if req.temperature == first.temperature and fits and not fut.done():
                group.append((req, fut))
                images += req.n
            elif not fut.done():
                rest.append((req, fut))
        self.queue = rest
        self.metrics.waiting.set(len(self.queue))
        return group

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.queue:
                if self.cfg.batch_wait_s and sum(r.n for r, _ in self.queue) < self.cfg.batch_images:
                    await asyncio.sleep(self.cfg.batch_wait_s)
                if not self.queue:
                    break
                group = self._take()
                if not group:
                    continue
                requests = [(r.n, r.seed) for r, _ in group]
                start = time.perf_counter()
                self.metrics.in_flight.inc(len(group))
                run_options = _run_options()
                self.active.add(run_options)
                try:
                    results = await loop.run_in_executor(
                        self.executor,
                        functools.partial(
                            self.sampler.sample_many,
                            requests,
                            group[0][0].temperature,
                            self.cfg.max_batch,
                            run_options=run_options,
                        ),
                    )
                    self.runs += 1
                    seconds = time.perf_counter() - start
                    for (_, fut), images in zip(group, results, strict=True):
                        if not fut.done():
                            fut.set_result((images, seconds))
                except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                    for _, fut in group:
                        if not fut.done():
                            fut.set_exception(exc)
                finally:
                    self.active.discard(run_options)
                    self.metrics.in_flight.dec(len(group))
        finally:
            self.pumps -= 1


def _run_options():
    import onnxruntime as ort

    return ort.RunOptions()


# --------------------------------------------------------------------------- the app
class ServerMetrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()  # per app: several apps in one process (tests) do not clash
        self.requests = Counter(
            "nvae_requests", "HTTP requests", ["endpoint", "code"], registry=self.registry
        )
        self.latency = Histogram(
            "nvae_request_latency_seconds",
            "Request latency (infer: queueing + sampling + encoding)",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.images = Counter("nvae_images", "Images generated", registry=self.registry)
        self.images_per_second = Gauge(
            "nvae_images_per_second", "Sampling throughput of the last infer request", registry=self.registry
        )
        self.in_flight = Gauge("nvae_infer_in_flight", "Infer requests sampling now", registry=self.registry)
        self.waiting = Gauge(
            "nvae_infer_waiting", "Infer requests waiting for a slot", registry=self.registry
        )


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
        start = time.perf_counter()
        try:
            response = await call_next(request)
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


# --------------------------------------------------------------------------- running it
def guarded_h11(header_timeout_s: float):
    """uvicorn's h11 protocol with a header deadline: a connection that has not completed a request's
    headers `header_timeout_s` after it opened (or after its previous response) is closed. uvicorn alone
    keeps a client that sends headers a byte at a time forever (its keep-alive timer stops at the first
    byte)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer = None
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.cycle is None or self.cycle.response_complete:  # still waiting for headers
                log.info(
                    "dropping %s: no complete request headers within %s s", self.client, header_timeout_s
                )
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # a new request's headers arrived
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol


def uvicorn_config(app, cfg: ServeConfig, **kwargs):
    """The uvicorn settings that enforce `cfg`'s connection limits (header deadline, bounded shutdown)."""
    import uvicorn

    return uvicorn.Config(
        app,
        http=guarded_h11(cfg.header_timeout_s),
        timeout_keep_alive=5,
        timeout_graceful_shutdown=max(1, math.ceil(cfg.shutdown_timeout_s)),
        **kwargs,
    )


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


class BackgroundServer:
    """uvicorn in a thread on an already bound socket (port 0 picks a free one), with the same connection
    limits as `serve`: for tests and benches.

    with BackgroundServer(app) as srv: httpx.get(srv.url + "/v2/health/ready")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = host, self.socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        cfg = getattr(app.state, "config", None) or ServeConfig()
        self.server = uvicorn.Server(uvicorn_config(app, cfg, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30) -> float:
        """Ask the server to stop as SIGTERM does; seconds until its thread ended."""
        start = time.monotonic()
        self.server.should_exit = True
        self.thread.join(timeout=timeout)
        return time.monotonic() - start

    def __exit__(self, *exc) -> None:
        self.stop(timeout=10)
        self.socket.close()
