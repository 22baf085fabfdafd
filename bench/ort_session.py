"""onnxruntime serving settings, side by side in one run: a session's start without and with the cache of the
optimised graph, and ms/image of a plain `session.run` against IO binding, per preset and batch.

Random-init decoders (BN statistics randomised), exported once per preset at the start (not timed).

    python bench/ort_session.py --presets fmnist-cpu mnist --batches 1 16 64 256 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_preset(preset: str, batches: list[int], repeats: int, tmp: Path) -> list[str]:
    import torch

    from inference.export import export_model, randomize_bn
    from model.config import get_preset
    from model.network import NVAE
    from serving.onnx_sampler import OnnxSampler

    torch.manual_seed(0)
    model = NVAE(get_preset(preset))
    randomize_bn(model)
    path = tmp / f"{preset}.onnx"
    export_model(model, path, exporter="torchscript", verify=False)
    lines = []

    cache = tmp / f"cache-{preset}"
    OnnxSampler(path, "cpu", cache_dir=cache)  # writes the cache entry
    cold = _median_s(lambda: OnnxSampler(path, "cpu"), repeats)
    warm = _median_s(lambda: OnnxSampler(path, "cpu", cache_dir=cache), repeats)
    assert OnnxSampler(path, "cpu", cache_dir=cache).cached
    lines.append(
        f"{preset:10s} session start: optimising {cold * 1000:7.1f} ms, from the cache {warm * 1000:7.1f} ms "
        f"({cold / warm:.2f}x faster)"
    )
    plain = OnnxSampler(path, "cpu", io_binding=False)
    bound = OnnxSampler(path, "cpu", io_binding=True)
    for batch in batches:
        for s in (plain, bound):
            s.sample(batch, 0.8, 0, batch)  # warm-up
        t_plain, t_bound = [], []
        for r in range(repeats):  # alternating, so both see the same machine
            for sampler, times in ((plain, t_plain), (bound, t_bound)):
                t = time.perf_counter()
                sampler.sample(batch, 0.8, r, batch)
                times.append(time.perf_counter() - t)
        a, b = statistics.median(t_plain) * 1000 / batch, statistics.median(t_bound) * 1000 / batch
        lines.append(
            f"{preset:10s} batch {batch:4d}: run {a:7.2f} ms/img, IO binding {b:7.2f} ms/img ({a / b:.2f}x)"
        )
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["fmnist-cpu", "mnist"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="nvae-ort-") as tmp:
        for preset in args.presets:
            for line in bench_preset(preset, args.batches, args.repeats, Path(tmp)):
                print(line, flush=True)


if __name__ == "__main__":
    main()
