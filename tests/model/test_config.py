import json

import pytest

from common.errors import ConfigError
from model.config import PRESETS, NVAEConfig, apply_overrides, build_config, get_preset, parse_set_args


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates_and_round_trips_through_json(name):
    cfg = get_preset(name)
    assert NVAEConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_released_table_values():
    assert get_preset("mnist").groups_per_scale == [10, 5]
    assert get_preset("celeba64").groups_per_scale == [20, 10, 5]
    assert get_preset("celebahq256").groups_per_scale == [16, 8, 4, 4, 4]
    assert get_preset("ffhq256").groups_per_scale == [16, 8, 4, 4, 4]
    assert get_preset("cifar10").groups_per_scale == [30]
    ffhq = get_preset("ffhq256")
    assert (ffhq.lr, ffhq.sr_lambda, ffhq.sr_anneal, ffhq.num_bits, ffhq.num_nf) == (8e-3, 0.1, True, 5, 2)
    assert get_preset("mnist").likelihood == "bernoulli" and get_preset("cifar10").output_channels == 100


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="unknown config field 'chanels'"):
        apply_overrides(get_preset("mnist"), {"chanels": 3})


def test_out_of_range_names_field_and_range():
    with pytest.raises(ConfigError, match=r"num_scales=0 is out of range; allowed 1 <= num_scales <= 8"):
        apply_overrides(get_preset("mnist"), {"num_scales": "0"})
    with pytest.raises(ConfigError, match="likelihood='gauss' is not allowed"):
        apply_overrides(get_preset("mnist"), {"likelihood": "gauss"})


def test_cli_strings_are_typed():
    cfg = apply_overrides(get_preset("mnist"), parse_set_args(["channels=64", "lr=2e-3", "sr_anneal=true"]))
    assert (cfg.channels, cfg.lr, cfg.sr_anneal) == (64, 2e-3, True)
    with pytest.raises(ConfigError, match="channels: expected int"):
        apply_overrides(get_preset("mnist"), {"channels": "many"})


def test_yaml_then_cli_override_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("channels: 48\nz_channels: 10\n")
    cfg = build_config("mnist", f, {"channels": "16"})
    assert (cfg.channels, cfg.z_channels) == (16, 10)
    f.write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        build_config("mnist", f)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'svhn'"):
        get_preset("svhn")


def test_imagenet32_trains_with_the_authors_random_horizontal_flip():
    """The authors give imagenet_32 the generic transforms (RandomHorizontalFlip in training, datasets.py)."""
    from model.config import build_config

    assert build_config("imagenet32", None, {}).flip is True
    assert build_config("mnist", None, {}).flip is False


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("batch_size: true\n", "batch_size: expected an integer, got true"),
        ("num_bits: eight\n", 'num_bits: expected an integer, got "eight"'),
        ("lr: '0.01'\n", 'lr: expected a number, got "0.01"'),
        ("lr: false\n", "lr: expected a number, got false"),
        ("binarize: 1\n", "binarize: expected true or false, got 1"),
        ("dataset: 7\n", "dataset: expected a string, got 7"),
        ("channels: [16]\n", "channels: expected an integer, got list"),
    ],
)
def test_a_config_file_is_checked_for_types_before_values_and_names_itself(tmp_path, text, says):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        build_config("fmnist-cpu", path)
    assert str(caught.value) == f"{path}: {says}"


def test_a_config_file_takes_integers_for_numbers_and_set_strings_still_convert(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1\nwarmup_epochs: 2\nbinarize: false\n")
    cfg = build_config("fmnist-cpu", path, {"batch_size": "8", "binarize": "true"})
    assert cfg.lr == 1.0 and cfg.warmup_epochs == 2.0 and cfg.batch_size == 8 and cfg.binarize is True


def test_a_yaml_syntax_error_is_one_line_with_line_and_column(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("channels: 16\nlr: [0.01\nbatch_size: 3\n")
    with pytest.raises(ConfigError) as caught:
        build_config("fmnist-cpu", path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}:3:11: not valid YAML: ")
