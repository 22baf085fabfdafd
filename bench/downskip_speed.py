"""The factorized reduce's four 1x1 convs: stride 2 on the shifted maps (as written) against stride 1 on their
subsampled views (what `model.layers.DownSkip` runs), forward + backward, fp32 channels-last, on this CPU.

    python bench/downskip_speed.py

Prints ms per call of each and the largest relative differences of the output and both gradients."""

import time

import torch
import torch.nn.functional as F

SHAPES = ((16, 64, 64), (32, 128, 32), (32, 16, 28), (200, 32, 32), (4, 30, 256))  # (batch, channels, side)


def run(x, w, b, subsample: bool):
    shifted = (x, x[:, :, 1:, 1:], x[:, :, :, 1:], x[:, :, 1:, :])
    convs = [F.conv2d(s[:, :, ::2, ::2], w, b) if subsample else F.conv2d(s, w, b, 2) for s in shifted]
    return torch.cat(convs, 1)


def main() -> None:
    torch.manual_seed(0)
    for batch, c, side in SHAPES:
        x0 = torch.randn(batch, c, side, side).contiguous(memory_format=torch.channels_last)
        w, b = torch.randn(c // 2, c, 1, 1), torch.randn(c // 2)
        res = {}
        for sub in (False, True):
            x, ww, bb = (t.clone().requires_grad_() for t in (x0, w, b))
            for _ in range(2):
                run(x, ww, bb, sub).square().sum().backward()
            x.grad = ww.grad = bb.grad = None
            t = time.perf_counter()
            for _ in range(10):
                y = run(x, ww, bb, sub)
                y.square().sum().backward()
            res[sub] = ((time.perf_counter() - t) / 10, y.detach(), x.grad / 10, ww.grad / 10)
        rel = [
            float((res[False][i] - res[True][i]).abs().max() / res[False][i].abs().max()) for i in (1, 2, 3)
        ]
        print(f"B={batch} C={c} {side}x{side}: stride 2 {res[False][0] * 1e3:.1f} ms, subsampled "
              f"{res[True][0] * 1e3:.1f} ms, ratio {res[True][0] / res[False][0]:.2f}; rel. diff y {rel[0]:.1e}, "
              f"grad x {rel[1]:.1e}, grad w {rel[2]:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
