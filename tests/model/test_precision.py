import contextlib

import pytest

from common.errors import ConfigError
from model.precision import autocast


def test_fp32_needs_no_autocast_context():
    assert isinstance(autocast("cpu", "fp32"), contextlib.nullcontext)


def test_an_unknown_precision_or_fp16_on_cpu_is_a_config_error():
    with pytest.raises(ConfigError, match="precision='fp8'; choose one of: fp32, bf16, fp16"):
        autocast("cpu", "fp8")
    with pytest.raises(ConfigError, match="precision=fp16 needs a CUDA device"):
        autocast("cpu", "fp16")
