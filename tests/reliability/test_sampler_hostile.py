"""The sampler against hostile and unlucky clients: slow connections, bugs that must stay 500s and be
counted, bearer-token authentication, and a shutdown that ends in bounded time whatever clients hold."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from background_server import BackgroundServer

from serving.app import create_app
from serving.config import ServeConfig

INFER = "/v2/models/nvae-decoder/infer"
BODY = {
    "inputs": [
        {"name": "n", "datatype": "INT64", "shape": [1], "data": [2]},
        {"name": "temperature", "datatype": "FP32", "shape": [1], "data": [0.7]},
        {"name": "seed", "datatype": "INT64", "shape": [1], "data": [1]},
    ]
}
TOKEN = "s3cr3t-token-of-32-characters-xx"


class FakeSampler:
    """Stands in for OnnxSampler: `seconds` of work in small steps, honouring `run_options.terminate` as
    onnxruntime does; `fail` raises instead (a bug in the sampling path)."""

    image_shape, providers, decode, metadata = (1, 4, 4), ["CPUExecutionProvider"], "mean", {}

    def __init__(self, seconds=0.0, fail=False):
        self.seconds, self.fail = seconds, fail
        self.started, self.stopped = threading.Event(), threading.Event()

    def sample(self, n, temperature, seed, batch_size=None, *, run_options=None):
        if self.fail:
            raise RuntimeError("a bug in the sampling path")
        self.started.set()
        end = time.monotonic() + self.seconds
        while time.monotonic() < end:
            if run_options is not None and run_options.terminate:
                self.stopped.set()
                raise RuntimeError("terminated")
            time.sleep(0.01)
        return np.zeros((n, 1, 4, 4), np.float32)

    def sample_many(self, requests, temperature, batch_size=None, *, run_options=None):
        return [self.sample(n, temperature, seed, run_options=run_options) for n, seed in requests]


def raw_connection(srv: BackgroundServer) -> socket.socket:
    s = socket.create_connection((srv.host, srv.port), timeout=10)
    return s


def closed_within(s: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing `s`, or None if it is still open after `seconds`."""
    s.settimeout(0.1)
    got, end = b"", time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk
    return None


def test_a_client_that_never_finishes_its_headers_is_dropped():
    cfg = ServeConfig(header_timeout_s=0.5)
    with BackgroundServer(create_app(FakeSampler(), cfg)) as srv:
        idle = raw_connection(srv)  # says nothing at all
        dribbler = raw_connection(srv)  # a byte every 0.1 s: uvicorn's keep-alive timer alone never fires
        start = time.monotonic()
        request = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100
        dropped_after = None
        for i in range(len(request)):
            try:
                dribbler.sendall(request[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                dropped_after = time.monotonic() - start
                break
            time.sleep(0.1)
        assert dropped_after is not None and 0.4 < dropped_after < 3.0, dropped_after  # deadline 0.5 s
        assert closed_within(idle, 3.0) == b""
        # A client that finishes in time is served, and its keep-alive connection serves a second request.
        ok = raw_connection(srv)
        ok.settimeout(5)
        for _ in range(2):
            ok.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            while not answer.endswith(b'{"live":true}'):
                answer += ok.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200")
        for s in (idle, dribbler, ok):
            s.close()


def test_a_body_that_does_not_arrive_in_time_is_408_and_the_connection_closes():
    cfg = ServeConfig(body_timeout_s=0.5)
    with BackgroundServer(create_app(FakeSampler(), cfg)) as srv:
        s = raw_connection(srv)
        s.sendall(
            f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            'Content-Length: 500\r\n\r\n{"inputs": '.encode()
        )
        start = time.monotonic()
        answer = closed_within(s, 3.0)
        assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
        assert b"not received within 0.5 s" in answer and time.monotonic() - start < 4.0
        s.close()
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'code="408",endpoint="/v2/models/{name}/infer"' in metrics


def test_a_bug_is_a_counted_500_without_a_traceback():
    with BackgroundServer(create_app(FakeSampler(fail=True), ServeConfig())) as srv:
        with httpx.Client(base_url=srv.url) as c:
            r = c.post(INFER, json=BODY)
            assert r.status_code == 500 and r.json() == {"error": "internal error (logged by the server)"}
            assert "Traceback" not in r.text
            c.post("/v2/models/other/infer", json=BODY)
            c.post(INFER, content=b"[" * 100)
            metrics = c.get("/metrics").text
    for code in ("500", "404", "400"):
        assert f'code="{code}",endpoint="/v2/models/{{name}}/infer"' in metrics, code


@pytest.mark.parametrize("batched", [False, True])
def test_bearer_token_guards_inference_and_metadata_only(batched):
    cfg = ServeConfig(auth_token=TOKEN, batch_images=8 if batched else 0)
    with BackgroundServer(create_app(FakeSampler(), cfg)) as srv, httpx.Client(base_url=srv.url) as c:
        good = {"Authorization": f"Bearer {TOKEN}"}
        for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/nvae-decoder/ready", "/metrics"):
            assert c.get(path).status_code == 200, path  # probes and scrapers need no token
        for method, path in (("GET", "/v2"), ("GET", "/v2/models/nvae-decoder"), ("POST", INFER)):
            for headers in ({}, {"Authorization": "Bearer wrong-token-of-some-length"},
                            {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}):  # fmt: skip
                r = c.request(method, path, json=BODY, headers=headers)
                assert r.status_code == 401, (path, headers)
                assert r.headers["www-authenticate"].startswith("Bearer") and "token" in r.json()["error"]
            assert c.request(method, path, json=BODY, headers=good).status_code == 200, path
        assert 'code="401"' in c.get("/metrics").text


@pytest.mark.parametrize("token", ["short", "has a space in it ....", "tab\tinside-the-token-xxxxxxxx"])
def test_a_weak_or_malformed_token_is_refused_at_start(token):
    with pytest.raises(ValueError, match="bearer token"):
        ServeConfig(auth_token=token).validate()


def test_shutdown_is_bounded_while_clients_hold_connections():
    """Five slow-header and five slow-body clients plus a run that would take a minute: the server exits
    within its grace period and stops the run."""
    sampler = FakeSampler(seconds=60)
    cfg = ServeConfig(shutdown_timeout_s=1, header_timeout_s=60, body_timeout_s=60, timeout_s=120)
    srv = BackgroundServer(create_app(sampler, cfg)).__enter__()
    held = []
    for _ in range(5):
        s = raw_connection(srv)
        s.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\n")
        held.append(s)
        s = raw_connection(srv)
        s.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n{{".encode())
        held.append(s)
    in_flight = threading.Thread(
        target=lambda: httpx.post(srv.url + INFER, json=BODY, timeout=120), daemon=True
    )
    in_flight.start()
    # wait until the minute-long run is in onnxruntime's place (a loaded machine is slow to get there)
    assert sampler.started.wait(30)
    took = srv.stop(timeout=20)
    srv.socket.close()
    assert not srv.thread.is_alive() and took < 8.0, took  # the grace period is 1 s
    assert sampler.stopped.wait(2.0)  # the minute-long run was told to stop
    for s in held:
        s.close()


def test_sigterm_stops_python_m_serving_in_bounded_time(tmp_path):
    """The real process: SIGTERM with slow clients connected ends it within the grace period."""
    onnx = _tiny_onnx(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "serving", "--onnx", str(onnx), "--port", str(port), "--shutdown-timeout", "1",
           "--header-timeout", "60", "--auth-token-file", str(token_file)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}{INFER}"
        assert httpx.post(url, json=BODY).status_code == 401
        assert httpx.post(url, json=BODY, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        held = []
        for _ in range(5):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n\r\n{{".encode())
            held.append(s)
        time.sleep(0.3)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught: the exit status is -SIGTERM.
        assert proc.wait(timeout=10) == -signal.SIGTERM
        assert time.monotonic() - start < 8.0  # grace 1 s
        for s in held:
            s.close()
        log = proc.stderr.read()
        assert "authentication on" in log and "Finished server process" in log, log
    finally:
        if proc.poll() is None:
            proc.kill()


def test_python_m_serving_reports_a_bad_token_file_in_one_line(tmp_path):
    empty = tmp_path / "token"
    empty.write_text("\n")
    for path, expected in ((empty, "is empty"), (tmp_path / "missing", "cannot read it")):
        r = subprocess.run(
            [sys.executable, "-m", "serving", "--onnx", str(tmp_path / "x.onnx"), "--auth-token-file", str(path)],
            capture_output=True, text=True, cwd=Path(__file__).parents[2],
        )  # fmt: skip
        assert r.returncode == 2 and expected in r.stderr and "Traceback" not in r.stderr, r.stderr


def _tiny_onnx(tmp_path: Path) -> Path:
    import torch
    from tiny import TINY

    from inference.export import export_model, randomize_bn
    from model.config import apply_overrides, get_preset
    from model.network import NVAE

    torch.manual_seed(0)
    model = NVAE(apply_overrides(get_preset("fmnist-cpu"), TINY))
    randomize_bn(model)
    path = tmp_path / "decoder.onnx"
    export_model(model, path, exporter="torchscript", verify=False)
    return path
