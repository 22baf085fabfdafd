"""Prior sampling's pixel step follows the authors' sample mode: the pixels are drawn at temperature 1."""

import torch

from model.network import NVAE
from model.prior_sampling import decode_images, draw_uniforms


def test_sample_mode_draws_pixels_at_temperature_one(tiny_cfg):
    torch.manual_seed(0)
    model = NVAE(tiny_cfg).eval()
    with torch.no_grad():
        logits = model.sample_logits(6, 0.6)
        cold = decode_images(model, logits, "sample", temperature=0.6, seed=3)
        warm = decode_images(model, logits, "sample", temperature=1.0, seed=3)
        dist = model.output_distribution(logits)
        direct = dist.sample_from_uniform(*draw_uniforms(dist, 3), temperature=1.0)
    assert torch.equal(cold, warm)  # the prior temperature never reaches the pixels
    levels = 2**tiny_cfg.num_bits - 1
    expected = torch.round(model.crop(direct).clamp(0, 1) * levels) / levels
    assert torch.equal(cold, expected)
