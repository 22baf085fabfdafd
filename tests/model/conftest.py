import pytest

from model.config import NVAEConfig, apply_overrides, get_preset


def tiny_config(**overrides) -> NVAEConfig:
    """A few-thousand-parameter NVAE with every mechanism on: two scales, flows, DMoL."""
    base = {
        "channels": 8,
        "z_channels": 4,
        "groups": 2,
        "num_scales": 2,
        "cells_enc": 1,
        "cells_dec": 1,
        "pre_blocks": 1,
        "pre_cells": 1,
        "post_blocks": 1,
        "post_cells": 1,
        "num_nf": 1,
        "data_size": 12,
        "image_size": 16,
    }
    base.update(overrides)
    return apply_overrides(get_preset("fmnist-cpu"), base)


@pytest.fixture
def tiny_cfg() -> NVAEConfig:
    return tiny_config()


@pytest.fixture
def make_tiny():
    """Factory for tiny configs with overrides (test modules cannot import conftest)."""
    return tiny_config
