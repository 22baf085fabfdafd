"""The Open Inference Protocol v2 sampling service, on a real uvicorn server on 127.0.0.1."""

import base64
import io
import statistics
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from background_server import BackgroundServer
from oip_cases import BAD, body
from tiny import TINY

from cli.main import main
from inference.export import export_model, randomize_bn
from model.config import apply_overrides, get_preset
from model.network import NVAE
from serving.app import create_app
from serving.config import ServeConfig
from serving.onnx_sampler import OnnxSampler
from serving.protocol import to_uint8_nhwc

LIMITS = ServeConfig(max_images_per_request=32, max_batch=8, timeout_s=20, max_concurrency=1, max_queue=8)
INFER = "/v2/models/nvae-decoder/infer"


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    torch.manual_seed(0)
    model = NVAE(apply_overrides(get_preset("fmnist-cpu"), TINY))
    randomize_bn(model)
    path = tmp_path_factory.mktemp("serve") / "decoder.onnx"
    # the serving path does not depend on the exporter; the TorchScript one keeps this module fast
    export_model(model, path, exporter="torchscript", verify=False)
    return OnnxSampler(path, "cpu")


@pytest.fixture(scope="module")
def server(sampler):
    with BackgroundServer(create_app(sampler, LIMITS)) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            yield client


def test_health_and_model_metadata(server):
    assert server.get("/v2/health/live").status_code == 200
    assert server.get("/v2/health/ready").json() == {"ready": True}
    meta = server.get("/v2/models/nvae-decoder").json()
    assert meta["name"] == "nvae-decoder" and meta["platform"] == "onnxruntime_onnx"
    assert [i["name"] for i in meta["inputs"]] == ["n", "temperature", "seed"]
    assert meta["outputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, 28, 28, 1]}]
    assert meta["parameters"]["providers"] == ["CPUExecutionProvider"]
    assert server.get("/v2/models/nvae-decoder/ready").status_code == 200
    assert server.get("/v2/models/other/ready").status_code == 404
    assert server.get("/v2/models/nvae-decoder/versions/2").status_code == 404


def test_infer_returns_the_sampler_images_as_uint8_nhwc(server, sampler):
    r = server.post(INFER, json=body(n=3, temperature=0.8, seed=7, id="req-1"))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model_name"] == "nvae-decoder" and out["id"] == "req-1"
    assert out["parameters"]["seed"] == 7 and out["parameters"]["decode"] == "mean"
    (images,) = out["outputs"]
    assert images["name"] == "images" and images["datatype"] == "UINT8" and images["shape"] == [3, 28, 28, 1]
    got = np.array(images["data"], dtype=np.uint8).reshape(images["shape"])
    np.testing.assert_array_equal(got, to_uint8_nhwc(sampler.sample(3, 0.8, 7)))
    again = server.post("/v2/models/nvae-decoder/versions/1/infer", json=body(n=3, temperature=0.8, seed=7))
    assert again.json()["outputs"][0]["data"] == images["data"]


def test_png_formats_decode_to_the_same_pixels(server):
    from PIL import Image

    raw = server.post(INFER, json=body(n=2, seed=3)).json()["outputs"][0]
    pixels = np.array(raw["data"], dtype=np.uint8).reshape(2, 28, 28)
    per_image = server.post(INFER, json=body(n=2, seed=3, parameters={"format": "png"})).json()["outputs"][0]
    assert per_image["datatype"] == "BYTES" and per_image["shape"] == [2]
    for k, b64 in enumerate(per_image["data"]):
        np.testing.assert_array_equal(np.array(Image.open(io.BytesIO(base64.b64decode(b64)))), pixels[k])
    grid = server.post(INFER, json=body(n=2, seed=3, parameters={"format": "png_grid"})).json()["outputs"][0]
    assert grid["shape"] == [1]
    assert Image.open(io.BytesIO(base64.b64decode(grid["data"][0]))).size == (2 * 30 + 2, 30 + 2)


def test_seed_is_optional_and_reported_so_answers_reproduce(server):
    first = server.post(INFER, json=body(n=2, seed=None)).json()
    seed = first["parameters"]["seed"]
    assert isinstance(seed, int)
    second = server.post(INFER, json=body(n=2, seed=seed)).json()
    assert second["outputs"][0]["data"] == first["outputs"][0]["data"]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_4xx_with_a_message(server, case):
    payload = BAD[case]
    if isinstance(payload, bytes):
        r = server.post(INFER, content=payload, headers={"content-type": "application/json"})
    else:
        r = server.post(INFER, json=payload)
    assert r.status_code == 400, (case, r.status_code, r.text)
    assert r.json()["error"]


def test_oversized_body_and_unknown_model_are_4xx(server):
    big = body(padding="x" * (LIMITS.max_body_bytes + 1))
    assert server.post(INFER, json=big).status_code == 413
    r = server.post("/v2/models/other/infer", json=body())
    assert r.status_code == 404 and "nvae-decoder" in r.json()["error"]


def test_metrics_count_requests_and_images(server):
    server.post(INFER, json=body(n=4))
    text = server.get("/metrics").text
    assert 'nvae_requests_total{code="200",endpoint="/v2/models/{name}/infer"}' in text
    assert 'code="400"' in text
    assert "nvae_images_total" in text and "nvae_images_per_second" in text
    assert "nvae_request_latency_seconds_bucket" in text


class _SlowSampler:
    """Stands in for OnnxSampler: sleeps in small steps, honouring `run_options.terminate` like onnxruntime."""

    image_shape, providers, decode, metadata = (1, 4, 4), ["CPUExecutionProvider"], "mean", {}

    def __init__(self, seconds):
        self.seconds = seconds

    def sample(self, n, temperature, seed, batch_size=None, *, run_options=None):
        end = time.monotonic() + self.seconds
        while time.monotonic() < end:
            if run_options is not None and run_options.terminate:
                raise RuntimeError("terminated")
            time.sleep(0.01)
        return np.zeros((n, 1, 4, 4), np.float32)


def test_timeout_is_503_and_a_full_queue_is_429():
    cfg = ServeConfig(timeout_s=0.3, max_concurrency=1, max_queue=0)
    with BackgroundServer(create_app(_SlowSampler(1.0), cfg)) as srv, httpx.Client(base_url=srv.url) as c:
        start = time.monotonic()
        r = c.post(INFER, json=body())
        assert r.status_code == 503 and "timed out" in r.json()["error"]
        assert time.monotonic() - start < 0.9  # the run was stopped, not awaited to its end
    cfg = ServeConfig(timeout_s=5, max_concurrency=1, max_queue=0)
    with BackgroundServer(create_app(_SlowSampler(0.5), cfg)) as srv, httpx.Client(base_url=srv.url) as c:
        results = []
        t = threading.Thread(target=lambda: results.append(c.post(INFER, json=body()).status_code))
        t.start()
        time.sleep(0.2)
        busy = c.post(INFER, json=body())
        t.join()
        assert results == [200] and busy.status_code == 429


def test_cli_serve_reports_a_missing_file_in_one_line(tmp_path, capsys):
    assert main(["serve", "--onnx", str(tmp_path / "none.onnx"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nvae serve: error: ONNX file not found") and "\n" not in err


@pytest.mark.slow
def test_bounded_load_on_loopback(sampler):
    """8 clients for 5 s against 127.0.0.1; reports p50/p99 latency, images/s and errors."""
    cfg = ServeConfig(max_images_per_request=32, max_batch=16, timeout_s=10, max_concurrency=2, max_queue=16)
    latencies, codes, lock = [], [], threading.Lock()
    with BackgroundServer(create_app(sampler, cfg)) as srv:
        stop = time.monotonic() + 5.0

        def client(k):
            with httpx.Client(base_url=srv.url, timeout=15) as c:
                while time.monotonic() < stop:
                    t = time.perf_counter()
                    r = c.post(INFER, json=body(n=8, seed=k))
                    with lock:
                        latencies.append(time.perf_counter() - t)
                        codes.append(r.status_code)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    lat = sorted(latencies)
    p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    errors = sum(c != 200 for c in codes)
    print(
        f"\nload: {len(codes)} requests, p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
        f"{8 * codes.count(200) / 5.0:.0f} images/s, errors {errors} ({set(codes)})"
    )
    assert all(c < 500 for c in codes) and errors == 0


# --------------------------------------------------------------------------- request batching
def test_sample_many_gives_each_request_its_own_images(sampler):
    alone = [sampler.sample(n, 0.8, seed) for n, seed in ((1, 3), (3, 4), (64, 5))]
    shared = sampler.sample_many([(1, 3), (3, 4), (64, 5)], 0.8, batch_size=16)
    for a, b in zip(alone, shared, strict=True):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1 / 255 + 1e-6


def _concurrently(srv, bodies):
    results = [None] * len(bodies)

    def post(i):
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            results[i] = c.post(INFER, json=bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_requests_share_runs_and_keep_their_answers(sampler):
    cfg = ServeConfig(
        max_images_per_request=32, max_batch=32, max_concurrency=1, batch_images=32, batch_wait_s=0.2
    )
    bodies = [body(n=2, seed=k) for k in range(8)] + [body(n=2, temperature=0.5, seed=9)]
    app = create_app(sampler, cfg)
    with BackgroundServer(app) as srv:
        answers = _concurrently(srv, bodies)
    assert [r.status_code for r in answers] == [200] * 9
    assert app.state.batcher.runs < 9  # shared runs (one temperature per run: at least 2)
    for b, r in zip(bodies, answers, strict=True):
        out = r.json()["outputs"][0]
        got = np.array(out["data"], np.uint8).reshape(out["shape"])
        t, seed = b["inputs"][1]["data"][0], b["inputs"][2]["data"][0]
        want = to_uint8_nhwc(sampler.sample(2, t, seed))
        assert np.abs(got.astype(int) - want).max() <= 1


def test_batched_server_still_times_out_and_refuses_when_full():
    class Slow(_SlowSampler):
        def sample_many(self, requests, temperature, batch_size=None, *, run_options=None):
            time.sleep(self.seconds)
            return [np.zeros((n, 1, 4, 4), np.float32) for n, _ in requests]

    cfg = ServeConfig(timeout_s=0.3, max_concurrency=1, max_queue=0, batch_images=8)
    with BackgroundServer(create_app(Slow(1.0), cfg)) as srv, httpx.Client(base_url=srv.url) as c:
        r = c.post(INFER, json=body())
        assert r.status_code == 503 and "timed out" in r.json()["error"]
    cfg = ServeConfig(timeout_s=5, max_concurrency=1, max_queue=0, batch_images=8)
    with BackgroundServer(create_app(Slow(0.5), cfg)) as srv:
        first, second = None, None

        def run_first():
            nonlocal first
            with httpx.Client(base_url=srv.url, timeout=10) as c:
                first = c.post(INFER, json=body()).status_code

        t = threading.Thread(target=run_first)
        t.start()
        time.sleep(0.2)
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            second = c.post(INFER, json=body()).status_code
        t.join()
        assert first == 200 and second == 429


def test_a_model_pulled_from_the_registry_reports_its_version(sampler, tmp_path):
    import json
    import shutil

    onnx = tmp_path / "decoder.onnx"
    shutil.copy(sampler.path, onnx)
    assert OnnxSampler(onnx, "cpu").registry_version is None  # not from a registry
    (tmp_path / "manifest.json").write_text(
        json.dumps({"name": "nvae-fmnist", "version": "0123456789abcdef"})
    )
    pulled = OnnxSampler(onnx, "cpu")
    assert pulled.registry_version == "nvae-fmnist/0123456789abcdef"
    with BackgroundServer(create_app(pulled, LIMITS)) as srv:
        meta = httpx.get(srv.url + "/v2/models/nvae-decoder").json()
    assert meta["parameters"]["registry_version"] == "nvae-fmnist/0123456789abcdef"


def test_a_client_that_disconnects_mid_body_is_a_499_not_a_500(sampler, caplog):
    """The client sends its headers and part of the body, then goes away: counted as 499 (client closed
    request), logged in one line without a traceback; the server goes on answering."""
    import socket

    with BackgroundServer(create_app(sampler, LIMITS)) as srv:
        with socket.create_connection((srv.host, srv.port)) as s:
            s.sendall(
                f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Content-Length: 1000\r\n\r\n{\"inputs\": [".encode()
            )
            time.sleep(0.3)  # the server is reading the body
        with httpx.Client(base_url=srv.url, timeout=30) as client:
            deadline = time.monotonic() + 10
            while 'code="499"' not in (text := client.get("/metrics").text) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.post(INFER, json=body(n=1)).status_code == 200
    assert 'nvae_requests_total{code="499",endpoint="/v2/models/{name}/infer"}' in text
    assert 'code="500"' not in text
    assert "Traceback" not in caplog.text and not any(r.exc_info for r in caplog.records)
