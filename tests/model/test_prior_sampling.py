"""Prior sampling's pixel step follows the authors' sample mode: the pixels are drawn at temperature 1."""

import pytest
import torch

from common.errors import ConfigError
from model.network import NVAE
from model.prior_sampling import decode_images, draw_uniforms, sample_images


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


def test_a_bad_temperature_or_decode_mode_is_a_config_error(tiny_cfg):
    model = NVAE(tiny_cfg).eval()
    with pytest.raises(ConfigError, match="temperature=0 must be > 0"):
        sample_images(model, 2, 0)
    with torch.no_grad():
        logits = model.sample_logits(2, 1.0)
    with pytest.raises(ConfigError, match="decode mode 'median'; choose one of: mean, sample"):
        decode_images(model, logits, "median")
