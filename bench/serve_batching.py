"""The sampling server under concurrent clients, request batching on and off, side by side in one run.

For each preset (random-init weights, BN statistics randomised; exported with the TorchScript exporter) and
each client count, clients on loopback post `--n`-image requests for `--seconds`; printed: requests,
images/s, p50/p99 latency, errors, and the ratio batched / unbatched.

    python bench/serve_batching.py --presets fmnist-cpu mnist --clients 1 8 32 --seconds 5 --n 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load(url: str, clients: int, seconds: float, n: int, headers: dict | None = None) -> dict:
    """`clients` threads posting n-image requests to `url` for `seconds`: requests, requests/s, images/s,
    p50/p99 latency, errors (non-200), 5xx and connection failures (counted as status 0)."""
    import httpx

    latencies, codes, lock = [], [], threading.Lock()
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=60, headers=headers) as c:
            while time.monotonic() < stop:
                body = {
                    "inputs": [
                        {"name": "n", "datatype": "INT64", "shape": [1], "data": [n]},
                        {"name": "temperature", "datatype": "FP32", "shape": [1], "data": [0.8]},
                        {"name": "seed", "datatype": "INT64", "shape": [1], "data": [k]},
                    ]
                }
                t = time.perf_counter()
                try:
                    code = c.post("/v2/models/nvae-decoder/infer", json=body).status_code
                except httpx.HTTPError:
                    code = 0  # connection-level failure
                with lock:
                    latencies.append(time.perf_counter() - t)
                    codes.append(code)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    lat = sorted(latencies)
    ok = codes.count(200)
    return {
        "requests": len(codes),
        "requests_per_s": len(codes) / elapsed,
        "images_per_s": ok * n / elapsed,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "errors": len(codes) - ok,
        "5xx": sum(500 <= c < 600 for c in codes),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["fmnist-cpu", "mnist"])
    ap.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--n", type=int, default=4, help="images per request")
    ap.add_argument("--batch-images", type=int, default=64)
    ap.add_argument("--batch-wait-ms", type=int, default=2)
    args = ap.parse_args()

    import torch

    from inference.export import export_model, randomize_bn
    from model.config import get_preset
    from model.network import NVAE
    from serving.app import create_app
    from serving.config import ServeConfig
    from serving.onnx_sampler import OnnxSampler
    from tests.background_server import BackgroundServer

    for preset in args.presets:
        torch.manual_seed(0)
        model = NVAE(get_preset(preset))
        randomize_bn(model)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "decoder.onnx"
            export_model(model, path, exporter="torchscript", verify=False)
            sampler = OnnxSampler(path, "cpu")
            for clients in args.clients:
                rows = {}
                for mode, batch_images in (("off", 0), ("on", args.batch_images)):
                    cfg = ServeConfig(
                        max_images_per_request=max(args.n, 1),
                        max_batch=args.batch_images,
                        timeout_s=60,
                        max_concurrency=1,
                        max_queue=256,
                        batch_images=batch_images,
                        batch_wait_s=args.batch_wait_ms / 1000 if batch_images else 0.0,
                    )
                    with BackgroundServer(create_app(sampler, cfg)) as srv:
                        rows[mode] = load(srv.url, clients, args.seconds, args.n)
                for mode, r in rows.items():
                    print(
                        f"{preset:10s} clients {clients:2d} batching {mode:3s}: {r['requests']:5d} requests, "
                        f"{r['images_per_s']:7.1f} img/s, p50 {r['p50_ms']:7.1f} ms, p99 {r['p99_ms']:7.1f} ms, "
                        f"errors {r['errors']}",
                        flush=True,
                    )
                ratio = rows["on"]["images_per_s"] / max(rows["off"]["images_per_s"], 1e-9)
                print(
                    f"{preset:10s} clients {clients:2d} batched / unbatched images/s: {ratio:.2f}x",
                    flush=True,
                )


if __name__ == "__main__":
    main()
