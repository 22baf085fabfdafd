"""BN readjustment (paper Sec. 3.2 / B.2): re-estimate the decoder's BN running statistics from prior samples
at the temperature that will be used for sampling, instead of keeping the training-time averages."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from common.errors import ConfigError
from common.files import check_writable, file_sha256
from common.progress import progress as progress_bar
from inference.checkpoints import default_device, load_for_inference
from model.checkpoint import save_checkpoint
from model.layers import shared_effective_weights
from model.network import NVAE
from model.regularizers import bn_layers

log = logging.getLogger(__name__)


def sampling_path_modules(model: NVAE) -> list[torch.nn.Module]:
    """Modules on the generative path that hold BN layers: decoder tower, up cells, postprocess."""
    return [model.dec_groups, model.dec_up, model.postprocess]


@torch.no_grad()
def readjust_bn(
    model: NVAE,
    temperature: float,
    iters: int = 500,
    batch: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run `iters` prior-sampling passes of `batch` at `temperature` with the sampling path's BN layers in
    train mode (momentum as built, 0.05), then leave the whole model in eval mode. Returns the settings."""
    if temperature <= 0:
        raise ConfigError(f"temperature={temperature} must be > 0")
    if iters < 1 or batch < 1:
        raise ConfigError(f"iters={iters} and batch={batch} must be >= 1")
    model.eval()
    for module in sampling_path_modules(model):
        module.train()
    n_bn = sum(len(bn_layers(m)) for m in sampling_path_modules(model))
    generator = torch.Generator(device=model.h.device).manual_seed(seed)
    start = time.perf_counter()
    bar = progress_bar(range(iters), disable=not progress, desc=f"readjust BN (t={temperature:g})", unit="it")
    with shared_effective_weights(model):  # the weights are fixed: normalise them once for all passes
        for _ in bar:
            model.sample_logits(batch, temperature, generator=generator)
    model.eval()
    _check_finite_statistics(model, temperature)
    seconds = time.perf_counter() - start
    log.info(
        "readjusted %d BN layers with %d x %d samples at t=%g in %.1f s",
        n_bn,
        iters,
        batch,
        temperature,
        seconds,
    )
    return {
        "temperature": float(temperature),
        "iters": iters,
        "batch": batch,
        "seed": seed,
        "bn_layers": n_bn,
        "seconds": seconds,
    }


def _check_finite_statistics(model: NVAE, temperature: float) -> None:
    """ConfigError naming the first BN layer whose readjusted mean or variance is not finite: samples at this
    temperature overflowed somewhere on the path, and such statistics would make every later sample NaN."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            if not (torch.isfinite(module.running_mean).all() and torch.isfinite(module.running_var).all()):
                raise ConfigError(
                    f"temperature={temperature:g}: the prior samples overflow (BN layer {name} has non-finite "
                    "statistics after readjustment); nothing was written; use a lower --temperature"
                )


def readjust_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    temperature: float,
    *,
    iters: int = 500,
    batch: int = 16,
    seed: int = 0,
    device: str | None = None,
) -> dict:
    """`readjust_bn` on a checkpoint, saved to `out` (atomically) with the source's training step and the
    settings under `bn_readjust`. Returns the settings: `readjust_bn`'s plus `source_checkpoint_sha256`."""
    check_writable(out)  # before the sampling passes
    model, payload = load_for_inference(checkpoint, default_device(device))
    settings = readjust_bn(model, temperature, iters, batch, seed)
    settings["source_checkpoint_sha256"] = file_sha256(checkpoint)
    save_checkpoint(out, model, extra={"bn_readjust": settings, "step": payload.get("step", 0)})
    return settings
