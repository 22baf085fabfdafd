"""Seconds per 1,000 images of `nvae fid`'s parts, side by side in one run: sampling through PyTorch eager and
through onnxruntime, the Inception features, and the Frechet distance (once per FID, whatever the count).

Random-init NVAE (BN statistics randomised) and random Inception weights of pytorch-fid's architecture
(`inference.fid.write_random_weights`): the cost of the real networks, meaningless values. Samples are the
mean image at t=0.8; every part sees --n images in batches of --batch.

    python bench/fid_speed.py --preset fmnist-cpu --n 200 --batch 50
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="fmnist-cpu")
    p.add_argument("--n", type=int, default=200, help="images per part")
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)

    import numpy as np
    import torch

    from inference import fid
    from inference.export import export_model, randomize_bn
    from model.config import get_preset
    from model.network import NVAE
    from model.precision import configure_cpu
    from model.prior_sampling import sample_images
    from serving.onnx_sampler import OnnxSampler

    configure_cpu()
    torch.manual_seed(0)
    model = NVAE(get_preset(a.preset))
    randomize_bn(model)
    model.eval()
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        onnx = Path(tmp) / "decoder.onnx"
        export_model(model, onnx, verify=False)
        sampler = OnnxSampler(onnx, "cuda" if a.device == "cuda" else "cpu")
        weights = Path(tmp) / "inception.pth"
        net = fid.load_inception(weights, fid.write_random_weights(weights), a.device)
        model.to(a.device)
        sizes = [min(a.batch, a.n - i) for i in range(0, a.n, a.batch)]

        def timed(draw):
            draw(sizes[0], 0)  # warm-up: allocations, onnxruntime's shape specialisation
            sync()
            t, out = time.perf_counter(), []
            for b, size in enumerate(sizes):
                out.append(np.asarray(draw(size, fid.batch_seed(0, b))))
            sync()
            return time.perf_counter() - t, np.concatenate(out)

        eager_s, images = timed(
            lambda n, s: sample_images(model, n, 0.8, s, decode="mean", batch_size=n).cpu()
        )
        ort_s, _ = timed(lambda n, s: sampler.sample(n, 0.8, s))
        features_s, act = timed(lambda n, s: fid.features(net, torch.from_numpy(images[:n])))
        t = time.perf_counter()
        mu, sigma = fid.statistics(act)
        fid.frechet_distance(mu, sigma, mu + 1e-3, sigma)
        distance_s = time.perf_counter() - t
    per = 1000 / a.n
    print(
        f"preset {a.preset}, {a.n} images in batches of {a.batch}, {a.device}, torch threads {torch.get_num_threads()}"
    )
    print("| part | s per 1,000 images |\n|---|---:|")
    print(f"| sampling, PyTorch eager | {eager_s * per:.1f} |")
    print(f"| sampling, onnxruntime | {ort_s * per:.1f} |")
    print(f"| Inception features | {features_s * per:.1f} |")
    print(f"| statistics + Frechet distance (once per FID) | {distance_s:.1f} |")
    best = min(eager_s, ort_s)
    print(f"samples + FID per 1,000 images (faster sampler): {(best + features_s) * per + distance_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
