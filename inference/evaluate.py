"""Importance-weighted evaluation: the log-likelihood bound of the paper (K samples), the ELBO, and how
much each latent group is used.

For an image x and K posterior samples z_k ~ q(z|x):  log p(x) >= log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x).
The K samples of a batch of images are evaluated in chunks: `chunk` copies of the batch go through the
network at once (memory permitting), not K sequential passes. The noise for sample k of a batch is drawn in
the same order whatever the chunk size, so every chunking gives the same numbers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.errors import CheckpointError, ConfigError, DataError
from common.files import atomic_path, atomic_write_text, file_sha256
from common.progress import progress as progress_bar
from inference.checkpoints import default_device, load_for_inference
from model.layers import shared_effective_weights
from model.network import NVAE

ACTIVE_KL_THRESHOLD = 0.1  # nats: a latent channel whose mean KL exceeds this is "active"


@dataclass
class BatchResult:
    """Per-image results (B,) for one batch, in nats."""

    log_px: torch.Tensor  # IW bound on log p(x)
    elbo: torch.Tensor  # mean over the K samples of the ELBO
    recon: torch.Tensor  # mean over the K samples of -log p(x|z)
    kl: torch.Tensor  # mean over the K samples of the total KL
    kl_groups: torch.Tensor  # (B, G) mean over the K samples
    kl_channels: list[torch.Tensor] = field(default_factory=list)  # per group (Z,), summed over the batch


def _noise(model: NVAE, batch: int, generator: torch.Generator, device) -> list[torch.Tensor]:
    return [torch.randn((batch, *s), generator=generator).to(device) for s in model.latent_shapes()]


@torch.no_grad()
def iw_batch(
    model: NVAE,
    x: torch.Tensor,
    k: int,
    chunk: int,
    generator: torch.Generator,
    on_chunk: Callable[[int], None] | None = None,
) -> BatchResult:
    """IW bound and ELBO for a batch x (B, C, D, D) with k samples per image, `chunk` samples per pass.

    Each pass is folded into running sums (a running log-sum-exp for the bound, in float64), so memory does
    not grow with k. `on_chunk(n)` is called after each pass with the image-samples it evaluated."""
    if k < 1 or chunk < 1:
        raise ConfigError(f"iw samples k={k} and chunk={chunk} must be >= 1")
    b = x.size(0)
    shapes = model.latent_shapes()
    log_sum_w = torch.full((b,), -math.inf, dtype=torch.float64, device=x.device)
    elbo, recon, kl = (torch.zeros(b, dtype=torch.float64, device=x.device) for _ in range(3))
    kl_groups = torch.zeros(b, len(shapes), dtype=torch.float64, device=x.device)
    kl_channels = [torch.zeros(s[0], device=x.device) for s in shapes]
    done = 0
    with shared_effective_weights(model):  # one weight norm for all chunks (and batches, see `evaluate`)
        while done < k:
            n = min(chunk, k - done)
            # sample-major noise: draws for sample j of this batch are the same for any chunking
            per_sample = [_noise(model, b, generator, x.device) for _ in range(n)]
            eps = [torch.cat([s[g] for s in per_sample]) for g in range(len(per_sample[0]))]
            xs = x.repeat(n, 1, 1, 1)
            out = model(xs, eps=eps)
            rec = model.reconstruction_nll(out.logits, xs).double()  # (n*B,)
            kl_stack = torch.stack(out.kl_all, dim=1).double()  # (n*B, G)
            log_w = (-rec + out.log_p.double() - out.log_q.double()).view(n, b)
            log_sum_w = torch.logaddexp(log_sum_w, torch.logsumexp(log_w, dim=0))
            recon += rec.view(n, b).sum(0)
            kl += kl_stack.sum(1).view(n, b).sum(0)
            elbo -= (rec + kl_stack.sum(1)).view(n, b).sum(0)
            kl_groups += kl_stack.view(n, b, -1).sum(0)
            for g, d in enumerate(out.kl_diag):  # d is the mean over the n*B rows: sum them
                kl_channels[g] += d * (n * b)
            done += n
            if on_chunk is not None:
                on_chunk(n * b)
    return BatchResult(
        log_px=(log_sum_w - math.log(k)).float(),
        elbo=(elbo / k).float(),
        recon=(recon / k).float(),
        kl=(kl / k).float(),
        kl_groups=(kl_groups / k).float(),
        kl_channels=kl_channels,
    )


def available_memory(device: torch.device) -> int:
    """Bytes a pass may still take: free GPU memory on CUDA; on the CPU, MemAvailable, or less where a cgroup
    (a pod's memory limit) leaves less."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = math.inf
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return int(free) if math.isfinite(free) else 2**62


def _resident_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_resident() -> bool:
    """Reset this process's peak resident size (VmHWM) to its current one (Linux's clear_refs "5"); False where
    that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_resident_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _release_free_heap() -> None:
    """Give glibc's retained free heap back to the OS, so that resident memory grows with what a pass
    allocates (a no-op where there is no glibc)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@torch.no_grad()
def _pass_peak(model: NVAE, x: torch.Tensor, n: int) -> int:
    """Bytes one forward pass (and its likelihood) of `n` copies of x[0] adds at its peak: on CUDA from the
    allocator's peak; on the CPU from the kernel's peak resident size, reset before the pass (where /proc allows
    it), else from the resident size read after every layer (slower: a hook on each)."""
    device = x.device
    xs = x[:1].expand(n, *x.shape[1:]).contiguous()
    eps = _noise(model, n, torch.Generator().manual_seed(0), device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        model.reconstruction_nll(model(xs, eps=eps).logits, xs)
        return torch.cuda.max_memory_allocated(device) - base
    _release_free_heap()
    base = _resident_bytes()
    if _reset_peak_resident():  # the kernel tracks the peak since the reset: one plain pass
        model.reconstruction_nll(model(xs, eps=eps).logits, xs)
        peak = _peak_resident_bytes()
        if peak is not None:
            return max(peak - base, 0)
    seen = [base]
    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    hooks = [m.register_forward_hook(lambda *_: seen.append(_resident_bytes())) for m in leaves]
    try:
        model.reconstruction_nll(model(xs, eps=eps).logits, xs)
    finally:
        for hook in hooks:
            hook.remove()
    return max(seen) - base


def check_pass_memory(model: NVAE, x: torch.Tensor, chunk: int) -> int:
    """ConfigError, before the long work, when one pass of `chunk` samples of the batch x would need more
    memory than is available (`available_memory`). The cost per image is measured: the growth of the peak
    from a pass of 1 image to one of 4, extrapolated linearly (an overestimate for large passes, where the
    fixed costs are shared: about 1.8x at 256 images of fmnist-cpu). Returns the estimate in bytes."""
    images = chunk * x.size(0)
    if images <= 4:
        return 0
    per_image = max(_pass_peak(model, x, 4) - _pass_peak(model, x, 1), 0) / 3
    need, free = int(per_image * images), available_memory(x.device)
    if need > free:
        most = max(1, int(free / per_image) // x.size(0))
        raise ConfigError(
            f"one pass of {chunk} samples x {x.size(0)} images needs about {need / 2**30:.1f} GiB "
            f"({per_image / 2**20:.1f} MiB per image, measured) and {free / 2**30:.1f} GiB are available; "
            f"lower --chunk (about {most} fits) or --batch-size"
        )
    return need


@torch.no_grad()
def evaluate(
    model: NVAE,
    batches: Iterable[torch.Tensor],
    k: int,
    chunk: int | None = None,
    seed: int = 0,
    total: int | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate `model` (put in eval mode) over `batches` of (B, C, D, D) images; returns the metrics dict.

    k: importance samples per image. chunk: samples per pass (default: as many as keep a pass near 256
    images on CUDA, 64 on CPU, where larger passes page-fault their blocks above glibc's 32 MiB mmap threshold:
    64 measured 1.6x faster than 256 for fmnist-cpu; the results do not depend on it). limit: stop after this
    many images.
    """
    if k < 1:
        raise ConfigError(f"iw_samples={k} must be >= 1")
    cfg = model.cfg
    model.eval()
    device = model.h.device
    per_pass = 256 if device.type == "cuda" else 64
    generator = torch.Generator().manual_seed(seed)
    sums = {"log_px": 0.0, "elbo": 0.0, "recon": 0.0, "kl": 0.0}
    log_px_squares = 0.0  # for the standard error of the NLL over images
    kl_groups = torch.zeros(model.num_groups, dtype=torch.float64)
    kl_channels = [torch.zeros(s[0], dtype=torch.float64) for s in model.latent_shapes()]
    n_images = 0
    # Counted in image-samples, one update per pass: the first line (with its eta) comes within seconds even
    # when one image's K samples take minutes.
    images = limit or total
    bar = progress_bar(
        total=images * k if images else None, disable=not progress, desc=f"evaluate (K={k})", unit="samples"
    )
    checked = False
    with shared_effective_weights(model):
        for x in batches:
            if limit is not None and n_images >= limit:
                break
            if limit is not None:
                x = x[: limit - n_images]
            x = x.to(device)
            step_chunk = chunk or max(1, min(k, per_pass // max(1, x.size(0))))
            if not checked:  # before the first full pass
                check_pass_memory(model, x, min(step_chunk, k))
                checked = True
            res = iw_batch(model, x, k, step_chunk, generator, on_chunk=bar.update)
            for key in sums:
                sums[key] += float(getattr(res, key).double().sum())
            log_px_squares += float(res.log_px.double().square().sum())
            kl_groups += res.kl_groups.double().sum(0).cpu()
            for g, c in enumerate(res.kl_channels):
                kl_channels[g] += c.double().cpu() / k
            n_images += x.size(0)
            bar.set_postfix(bpd=f"{-sums['log_px'] / n_images / (math.log(2) * cfg.dims):.4f}")
    bar.close()
    if n_images == 0:
        raise DataError("no images to evaluate")
    per_dim = math.log(2) * cfg.dims
    mean = {key: v / n_images for key, v in sums.items()}
    kl_channel_means = [c / n_images for c in kl_channels]
    variance = max(log_px_squares / n_images - mean["log_px"] ** 2, 0.0) * n_images / max(n_images - 1, 1)
    stderr = math.sqrt(variance / n_images)  # of the mean over images: their spread and the IW noise together
    active = [int((c > ACTIVE_KL_THRESHOLD).sum()) for c in kl_channel_means]
    return {
        "num_images": n_images,
        "iw_samples": k,
        "nll_nats": -mean["log_px"],
        "nll_bpd": -mean["log_px"] / per_dim,
        "nll_nats_stderr": stderr,
        "nll_bpd_stderr": stderr / per_dim,
        "elbo_nats": mean["elbo"],
        "nelbo_bpd": -mean["elbo"] / per_dim,
        "recon_nats": mean["recon"],
        "kl_nats": mean["kl"],
        "kl_per_group": [float(v) for v in kl_groups / n_images],
        "active_channels": sum(active),
        "active_channels_per_group": active,
        "latent_channels": sum(s[0] for s in model.latent_shapes()),
        "active_threshold_nats": ACTIVE_KL_THRESHOLD,
        "dims": cfg.dims,
        "likelihood": cfg.likelihood if cfg.likelihood == "bernoulli" else f"dmol-{cfg.num_bits}bit",
        "likelihood_edge": cfg.dmol_edge if cfg.likelihood == "dmol" else "n/a",
        "seed": seed,
    }


def plot_kl_per_group(metrics: dict[str, Any], path: str | Path) -> None:
    """Bar plot of KL per latent group, coarse to fine (paper Fig. 5b), as PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kl = metrics["kl_per_group"]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.3 * len(kl) + 2), 3.0), dpi=120)
    try:
        ax.bar(range(len(kl)), kl, color="#4472c4")
        ax.set_xlabel("latent group (coarse \u2192 fine)")
        ax.set_ylabel("KL (nats / image)")
        ax.set_title(f"KL per group: {metrics.get('active_channels', '?')} active channels")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)


def plot_kl_file(metrics_path: str | Path, out: str | Path) -> Path:
    """`plot_kl_per_group` of a metrics file written by `evaluate_checkpoint`; returns the PNG's path. Raises
    DataError when the file cannot be read or is not such a file (`common.schema.EvalMetrics`)."""
    from common.schema import EvalMetrics, read_json

    metrics = read_json(metrics_path, EvalMetrics, DataError, "metrics file")
    plot_kl_per_group(metrics.model_dump(), out)
    return Path(out)


# --------------------------------------------------------------------------- a checkpoint on prepared data
def check_data_matches(model: NVAE, data_dir: str | Path) -> dict[str, Any]:
    """The manifest of prepared `data_dir`; DataError unless it holds the dataset `model` was built for."""
    from data.loaders import read_manifest

    manifest = read_manifest(data_dir)
    if manifest["dataset"] != model.cfg.dataset:
        raise DataError(
            f"--data {data_dir} holds {manifest['dataset']!r} but the checkpoint's model is for {model.cfg.dataset!r}"
        )
    return manifest


def evaluate_checkpoint(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    split: str | None = None,
    iw_samples: int = 1000,
    chunk: int | None = None,
    batch_size: int = 16,
    limit: int | None = None,
    binarization: str = "fixed",
    seed: int = 0,
    kl_plot: str | Path | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Evaluate `checkpoint` on a split of prepared `data` (default: the one the authors report on) with
    `iw_samples` importance samples per image; write the metrics JSON to `out` atomically (and, with
    `kl_plot`, the KL-per-group PNG there). Returns the metrics dict: `evaluate`'s, plus dataset, split,
    binarization, checkpoint, checkpoint_sha256 and train_step.

    binarization (binarized datasets): "fixed" (a fixed-seed test set) or "dynamic" (the released protocol,
    drawn with `seed`). Raises DataError when `data` holds another dataset (before any long work), and
    CheckpointError, writing nothing, when the bound is not finite.
    """
    from common.files import check_writable
    from data.loaders import make_loader
    from data.recipes import default_eval_split

    for target in (out, kl_plot) if kl_plot else (out,):
        check_writable(target)  # a read-only or full folder is found now, not after the evaluation
    device = default_device(device)
    model, payload = load_for_inference(checkpoint, device)
    check_data_matches(model, data)  # before any long work
    cfg = model.cfg
    if split is None:
        split = default_eval_split(cfg.dataset)
    dynamic = cfg.binarize and binarization == "dynamic"
    loader = make_loader(
        data,
        split,
        batch_size,
        train=dynamic,
        seed=seed,
        flip=False,
        drop_last=False,
        binarize=cfg.binarize,
        device=device,
    )
    n_total = len(loader.dataset) if hasattr(loader, "dataset") else None
    metrics = evaluate(model, loader, iw_samples, chunk, seed, total=n_total, limit=limit)
    metrics.update(
        {
            "dataset": cfg.dataset,
            "split": split,
            "binarization": _binarization_label(cfg.binarize, dynamic, seed),
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": file_sha256(checkpoint),
            "train_step": payload.get("step"),
        }
    )
    bad = [k for k in ("nll_bpd", "nelbo_bpd", "kl_nats") if not math.isfinite(metrics[k])]
    if bad:  # NaN is not JSON, and a metrics file holding it would look like a result
        raise CheckpointError(
            f"{checkpoint}: non-finite {', '.join(bad)} (NaN or inf weights?); nothing written"
        )
    atomic_write_text(out, json.dumps(metrics, indent=2, sort_keys=True, allow_nan=False) + "\n")
    if kl_plot:
        plot_kl_per_group(metrics, kl_plot)
    return metrics


def _binarization_label(binarize: bool, dynamic: bool, seed: int) -> str:
    """How the evaluated images were binarized, as the metrics file records it."""
    from data.loaders import EVAL_BINARIZE_SEED

    if not binarize:
        return "n/a (not a binarized dataset)"
    if dynamic:
        return f"dynamic (released protocol), seed {seed}"
    return f"fixed-seed ({EVAL_BINARIZE_SEED})"
