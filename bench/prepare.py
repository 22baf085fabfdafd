"""Images/s of `nvae prepare`'s DALI path against a plain PIL loop doing the same work on the same folder.

Both sides read every file, decode it, resize the shorter side to --size (bilinear, antialiased), centre-crop
and store uint8 (N, size, size, 3). DALI's side is the whole `prepare` call (listing, checksums, .npy and
manifest writing included); PIL's side is a single-threaded loop. Best of --repeats runs each.

    .venv/bin/python bench/prepare.py                        # generated CelebA-like JPEG folder
    .venv/bin/python bench/prepare.py --folder DIR --size 64  # an existing PNG/JPEG folder
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data.dali_ops import cpu_threads, resolve_device
from data.prepare import prepare
from data.sources import list_images


def make_folder(root: Path, count: int, height: int, width: int, fmt: str) -> None:
    """`count` smooth random images of height x width in `fmt` (jpg or png)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        f = rng.uniform(0.01, 0.1, (3, 2))
        phase = rng.uniform(0, 6.3, 3)
        img = np.stack([127.5 + 127.5 * np.sin(f[c, 0] * x + f[c, 1] * y + phase[c]) for c in range(3)], -1)
        img += rng.normal(0, 8, img.shape)  # some texture, so the codecs do real work
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / f"{i:06d}.{fmt}", quality=90)


def pil_loop(paths: list[Path], size: int) -> np.ndarray:
    """The plain way: one image at a time with PIL; uint8 (N, size, size, 3)."""
    out = np.empty((len(paths), size, size, 3), np.uint8)
    for i, path in enumerate(paths):
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
            w, h = img.size
            scale = size / min(w, h)
            nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
            img = img.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            out[i] = np.asarray(img.crop((left, top, left + size, top + size)))
    return out


def best_rate(fn, count: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return count / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--folder", type=Path, help="existing PNG/JPEG folder (default: generate one)")
    parser.add_argument("--count", type=int, default=1000, help="images to generate (default 1000)")
    parser.add_argument("--shape", default="218x178", help="generated image HxW (default CelebA's 218x178)")
    parser.add_argument("--format", choices=("jpg", "png"), default="jpg", help="generated format")
    parser.add_argument("--size", type=int, default=64, help="stored side (default 64)")
    parser.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    try:
        folder = args.folder
        if folder is None:
            folder = work / "images"
            folder.mkdir()
            h, w = (int(v) for v in args.shape.split("x"))
            make_folder(folder, args.count, h, w, args.format)
            what = f"generated, {args.format.upper()} {h}x{w}"
        else:
            what = "given"
        paths = list_images(folder.resolve())
        device = resolve_device(args.device)

        def dali_run() -> None:
            prepare("image-folder", folder, work / "out", device=device, size=args.size, overwrite=True)

        dali_run()  # warm-up: library loading and first pipeline build
        dali_rate = best_rate(dali_run, len(paths), args.repeats)
        pil_loop(paths[:20], args.size)
        pil_rate = best_rate(lambda: pil_loop(paths, args.size), len(paths), args.repeats)

        print(f"folder: {folder} ({what}), {len(paths)} images -> {args.size}x{args.size}x3")
        print(f"DALI ({device}, {cpu_threads()} CPU threads), whole `prepare`: {dali_rate:8.1f} images/s")
        print(f"PIL loop (1 thread), decode + resize + crop:    {pil_rate:8.1f} images/s")
        print(f"ratio DALI / PIL: {dali_rate / pil_rate:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
