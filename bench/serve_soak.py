"""A bounded soak of the sampler process: 32 clients sampling while 50 slow clients hold connections.

Runs the real server (`python -m serving`, authentication on, request batching on) on loopback with a
decoder exported from random-init weights of `--preset`, then two phases of `--seconds` each, side by side:
(1) the sampling clients alone, (2) the same clients plus `--slow` hostile ones, half dribbling request
headers a byte at a time, half sending headers and then a body that never completes, each reconnecting as
soon as the server drops it. Printed per phase: requests/s, images/s, p50/p99 latency, the count of 5xx and
of other non-200 answers, how many slow connections the server dropped, and the server's RSS; then the
ratio of phase 2 to phase 1.

    python bench/serve_soak.py --preset fmnist-cpu --clients 32 --slow 50 --seconds 30
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve_batching import load  # noqa: E402 - the same clients, side by side with the batching bench

INFER = "/v2/models/nvae-decoder/infer"


def sampling_clients(url: str, token: str, clients: int, seconds: float, n: int) -> dict:
    """serve_batching's load with the bearer token; non-200 answers split into 5xx and the rest."""
    row = load(url, clients, seconds, n, headers={"Authorization": f"Bearer {token}"})
    row["other_errors"] = row["errors"] - row["5xx"]
    return row


class SlowClients:
    """`count` threads, each holding one connection open as long as the server lets it: dribbling headers
    (even k) or an unfinished body (odd k), reconnecting whenever it is dropped."""

    def __init__(self, port: int, count: int):
        self.port, self.count = port, count
        self.stop = threading.Event()
        self.dropped = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(k,), daemon=True) for k in range(count)]

    def run(self, k: int) -> None:
        headers = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        while not self.stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    if k % 2:
                        s.sendall((headers + "Content-Length: 4000\r\n\r\n{").encode())
                        payload = b" " * 3000  # a byte every 0.5 s, never the whole body
                    else:
                        payload = headers.encode() * 100  # headers that never end
                    for byte in payload:
                        if self.stop.wait(0.5):
                            return
                        s.sendall(bytes([byte]))
            except OSError:
                pass  # dropped by the server: count it and come back
            with self.lock:
                self.dropped += 1

    def __enter__(self) -> SlowClients:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="fmnist-cpu")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--slow", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--n", type=int, default=4, help="images per request")
    args = ap.parse_args()

    import torch

    from inference.export import export_model, randomize_bn
    from model.config import get_preset
    from model.network import NVAE
    from tests.background_server import wait_ready

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = NVAE(get_preset(args.preset))
        randomize_bn(model)
        onnx = Path(tmp) / "decoder.onnx"
        export_model(model, onnx, exporter="torchscript", verify=False)
        token = secrets.token_urlsafe(24)
        (Path(tmp) / "token").write_text(token)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        cmd = [sys.executable, "-m", "serving", "--onnx", str(onnx), "--port", str(port),
               "--auth-token-file", str(Path(tmp) / "token"), "--batch-images", "64", "--batch-wait-ms", "2",
               "--max-queue", str(2 * args.clients), "--max-concurrency", "1"]  # fmt: skip
        server = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            if not wait_ready(url, server, timeout_s=120, interval_s=0.2):
                sys.exit("serve_soak: the server did not start")
            print(f"preset {args.preset}, {args.clients} clients x {args.n} images, {args.seconds:.0f} s per phase, "
                  f"{os.cpu_count()} CPUs, server pid {server.pid}")  # fmt: skip
            rows = {}
            rows["alone"] = sampling_clients(url, token, args.clients, args.seconds, args.n)
            rows["alone"].update(dropped=0, rss_mb=rss_mb(server.pid))
            with SlowClients(port, args.slow) as slow:
                time.sleep(1.0)
                rows[f"+{args.slow} slow"] = sampling_clients(url, token, args.clients, args.seconds, args.n)
                rows[f"+{args.slow} slow"].update(dropped=slow.dropped, rss_mb=rss_mb(server.pid))
            cols = ("requests_per_s", "images_per_s", "p50_ms", "p99_ms", "5xx", "other_errors", "dropped",
                    "rss_mb")  # fmt: skip
            print("| phase | " + " | ".join(cols) + " |")
            print("|---" * (len(cols) + 1) + "|")
            for name, row in rows.items():
                print(f"| {name} | " + " | ".join(f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c])
                                                  for c in cols) + " |")  # fmt: skip
            a, b = rows["alone"], rows[f"+{args.slow} slow"]
            print(f"ratio with/without slow clients: requests/s {b['requests_per_s'] / a['requests_per_s']:.2f}x, "
                  f"p99 {b['p99_ms'] / a['p99_ms']:.2f}x")  # fmt: skip
            start = time.monotonic()
            server.terminate()
            code = server.wait(timeout=60)
            print(f"SIGTERM to exit: {time.monotonic() - start:.2f} s (status {code})")
        finally:
            if server.poll() is None:
                server.kill()


if __name__ == "__main__":
    main()
