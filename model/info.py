"""Model facts for `nvae info`: sizes, layer counts, latent layout and forward cost."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.config import NVAEConfig
from model.network import NVAE
from model.regularizers import bn_layers, conv_layers


def build_on_meta(cfg: NVAEConfig) -> NVAE:
    """Build the network without allocating weights (for counting large presets)."""
    with torch.device("meta"):
        return NVAE(cfg)


def forward_flops(model: NVAE) -> int:
    """FLOPs (2 per multiply-add; grouped convs counted per group) of one encoder+decoder pass of one image."""
    cfg = model.cfg
    x = torch.zeros(1, cfg.in_channels, cfg.data_size, cfg.data_size, device=model.h.device)
    was_training = model.training
    model.eval()
    try:
        # (with gradients on: the module tracker of FlopCounterMode rejects no-grad views of parameters)
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def model_info(cfg: NVAEConfig, preset: str | None = None) -> dict[str, Any]:
    model = build_on_meta(cfg)
    return {
        "preset": preset,
        "dataset": cfg.dataset,
        "parameters": sum(p.numel() for p in model.parameters()),
        "conv_layers": len(conv_layers(model)),
        "bn_layers": len(bn_layers(model)),
        "groups_per_scale_coarse_to_fine": list(reversed(cfg.groups_per_scale)),
        "num_groups": model.num_groups,
        "latent_shapes": [list(s) for s in model.latent_shapes()],
        "latent_dims": sum(c * h * w for c, h, w in model.latent_shapes()),
        "input_shape": [cfg.in_channels, cfg.data_size, cfg.data_size],
        "likelihood": cfg.likelihood if cfg.likelihood == "bernoulli" else f"dmol-{cfg.num_bits}bit",
        "num_flow_pairs_per_group": cfg.num_nf,
        "batch_per_process": cfg.batch_size,
        "recipe_processes": cfg.recipe_processes,
        "global_batch": cfg.global_batch,
        "forward_gflop_per_image": forward_flops(model) / 1e9,
    }


def format_info(info: dict[str, Any]) -> str:
    shapes = info["latent_shapes"]
    compact: list[str] = []
    for shape in shapes:  # run-length encode the per-group shapes
        text = "x".join(map(str, shape))
        if compact and compact[-1].split(" * ")[0] == text:
            head, _, n = compact[-1].partition(" * ")
            compact[-1] = f"{head} * {int(n or 1) + 1}"
        else:
            compact.append(text)
    lines = [
        f"preset                 {info['preset'] or '-'} ({info['dataset']})",
        f"parameters             {info['parameters']:,}",
        f"conv / BN layers       {info['conv_layers']} / {info['bn_layers']}",
        f"groups per scale       {info['groups_per_scale_coarse_to_fine']} (coarse to fine, "
        f"{info['num_groups']} groups)",
        f"latent shapes (ZxHxW)  {', '.join(compact)}",
        f"latent dims            {info['latent_dims']:,}",
        f"input                  {'x'.join(map(str, info['input_shape']))}, {info['likelihood']}",
        f"flow pairs per group   {info['num_flow_pairs_per_group']}",
        f"batch                  {info['batch_per_process']} per process x {info['recipe_processes']} processes "
        f"= global batch {info['global_batch']} (the recipe's)",
        f"forward GFLOP / image  {info['forward_gflop_per_image']:.3f}",
    ]
    return "\n".join(lines)
