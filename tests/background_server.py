"""`BackgroundServer`: the sampler's HTTP app on the built-in server's own transport (serving.transport), run
in a thread on a bound socket, for the tests and bench/serve_batching.py; `wait_ready` for a server started
as a subprocess (`python -m serving`)."""

from __future__ import annotations

import socket
import threading
import time

from serving.config import ServeConfig
from serving.transport import uvicorn_config


class BackgroundServer:
    """uvicorn in a thread on an already bound socket (port 0 picks a free one), with the same connection
    limits as `serve`: for tests and benches.

    with BackgroundServer(app) as srv: httpx.get(srv.url + "/v2/health/ready")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
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


def wait_ready(url: str, process, timeout_s: float, interval_s: float = 0.3) -> bool:
    """Poll `url`/v2/health/ready until it answers 200 (True), or until `process` (a server started as a
    subprocess) exits or `timeout_s` passes (False)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
