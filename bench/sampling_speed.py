"""ms/image of prior sampling: PyTorch eager vs onnxruntime, side by side in one run, per preset and batch.

Random-init weights (BN statistics randomised), decode=mean, temperature 0.8. Both sides draw the noise from
the same seeded generator and decode to quantised images, so the work is the same; the table also shows the
max |difference| of the two outputs. The ONNX graph is exported once per preset at the start (not timed).

    python bench/sampling_speed.py --presets fmnist-cpu mnist --batches 1 16 64 256 --repeats 3
    python bench/sampling_speed.py --device cuda --fp16      # GPU day: PyTorch CUDA eager vs onnxruntime-gpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _time(fn, repeats: int, sync=lambda: None) -> float:
    fn()  # warm-up: first-run allocations, onnxruntime shape specialisation, cuDNN algorithm search
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_preset(
    preset: str, batches: list[int], repeats: int, device: str, fp16: bool, exporter: str, tmp: Path
):
    import numpy as np
    import torch

    from inference.export import export_model, randomize_bn
    from model.config import get_preset
    from model.network import NVAE
    from model.precision import configure_cpu
    from model.prior_sampling import sample_images
    from serving.onnx_sampler import OnnxSampler

    configure_cpu()
    torch.manual_seed(0)
    model = NVAE(get_preset(preset))
    randomize_bn(model)
    model.eval()
    path = tmp / f"{preset}.onnx"
    t = time.perf_counter()
    export_model(model, path, fp16=fp16, exporter=exporter, verify=False)
    export_s = time.perf_counter() - t
    sampler = OnnxSampler(path, "cuda" if device == "cuda" else "cpu")
    torch_model = model.to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for b in batches:
        reps = max(1, repeats if b <= 64 else repeats // 2 or 1)
        eager = _time(lambda b=b: sample_images(torch_model, b, 0.8, 0, batch_size=b), reps, sync)
        onnx = _time(lambda b=b: sampler.sample(b, 0.8, 0, batch_size=b), reps)
        a = sample_images(torch_model, b, 0.8, 0, batch_size=b).numpy()
        o = sampler.sample(b, 0.8, 0, batch_size=b)
        rows.append((preset, b, 1000 * eager / b, 1000 * onnx / b, eager / onnx, float(np.abs(a - o).max())))
    return rows, export_s, sampler.providers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["fmnist-cpu", "mnist"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256])
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per point (median; halved above 64)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--fp16", action="store_true", help="time an fp16 export (GPU)")
    ap.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"))
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__}, "
        f"device {args.device}, exporter {args.exporter}, fp16 {args.fp16}, repeats {args.repeats}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        all_rows = []
        for preset in args.presets:
            rows, export_s, providers = bench_preset(
                preset, args.batches, args.repeats, args.device, args.fp16, args.exporter, Path(tmp)
            )
            print(f"{preset}: export {export_s:.1f} s, onnxruntime providers {providers}")
            all_rows.extend(rows)
    print(
        "\n| preset | batch | PyTorch eager ms/img | onnxruntime ms/img | speed-up (eager/ort) | max abs diff |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for preset, b, eager, onnx, ratio, diff in all_rows:
        print(f"| {preset} | {b} | {eager:.2f} | {onnx:.2f} | {ratio:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
