import json

from cli.main import main


def test_info_json_reports_parity_numbers(capsys):
    assert main(["info", "--preset", "mnist", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 33_363_134 and info["conv_layers"] == 255 and info["bn_layers"] == 214
    assert info["groups_per_scale_coarse_to_fine"] == [5, 10]
    assert info["latent_shapes"][0] == [20, 4, 4] and info["latent_shapes"][-1] == [20, 8, 8]


def test_bad_override_is_one_line_and_exit_2(capsys):
    assert main(["info", "--preset", "mnist", "--set", "num_scales=99"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "nvae info: error: num_scales=99 is out of range; allowed 1 <= num_scales <= 8"


def test_yaml_config_file_is_used(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("channels: 8\n")
    assert main(["info", "--preset", "fmnist-cpu", "--config", str(f), "--json"]) == 0
    small = json.loads(capsys.readouterr().out)["parameters"]
    assert main(["info", "--preset", "fmnist-cpu", "--json"]) == 0
    assert small < json.loads(capsys.readouterr().out)["parameters"]
