"""Request batching and the servers' Prometheus metrics.

Each infer request already uses every core, so the server runs at most `max_concurrency` onnxruntime calls
at once; with batching on (`batch_images` > 0), requests of one temperature that wait together share one call
(`OnnxSampler.sample_many`), which gives each the images it would get alone. `ServerMetrics` holds the
counters and gauges both servers export, the batcher's queue length and runs in flight included.
"""

from __future__ import annotations

import asyncio
import functools
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from serving.config import ServeConfig
from serving.onnx_sampler import OnnxSampler
from serving.protocol import BadRequest, InferRequest


class ServerMetrics:
    """The Prometheus metrics of one server, in a registry of its own."""

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
