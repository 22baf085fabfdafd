"""`nvae prepare` on the command line: help, success, and one clear error line with exit code 2."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import numpy as np
import pytest

import cli.data
import cli.main
import data
from data.loaders import read_manifest


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvae")
    cli.data.register(parser.add_subparsers(dest="command"))
    return parser


def test_help_lists_the_options_and_datasets(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["prepare", "--help"])
    text = capsys.readouterr().out
    for word in (
        "--dataset",
        "--source",
        "--out",
        "--bits",
        "--device",
        "--skip-corrupt",
        "--limit",
        "celeba64",
    ):
        assert word in text


def test_prepare_command_succeeds(tmp_path: Path, small_fmnist: Path) -> None:
    args = _parser().parse_args(
        ["prepare", "--dataset", "mnist", "--source", str(small_fmnist), "--out", str(tmp_path / "o"),
         "--device", "cpu", "--limit", "5"]
    )  # fmt: skip
    assert args.func(args) == 0
    assert read_manifest(tmp_path / "o")["dataset"] == "mnist"


def test_nvae_entry_point_reports_bad_input_in_one_line(
    tmp_path: Path, small_fmnist: Path, datagen, capsys: pytest.CaptureFixture
) -> None:
    bad = datagen.write_idx(
        small_fmnist / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8), magic=0x801
    )
    argv = [
        "prepare",
        "--dataset",
        "fashion-mnist",
        "--source",
        str(small_fmnist),
        "--out",
        str(tmp_path / "o"),
    ]
    assert cli.main.main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1] == f"nvae prepare: error: {bad}: wrong idx magic number 0x00000801 (expected 0x00000803, "
        "unsigned-byte images with 3 dimensions)"
    )
    assert not (tmp_path / "o").exists()


def test_bad_choices_are_refused_by_the_parser(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["prepare", "--dataset", "mnist", "--source", "s", "--out", "o", "--bits", "6"])
    assert exc.value.code == 2 and "invalid choice: 6" in capsys.readouterr().err


def test_data_layer_imports_nothing_above_it() -> None:
    forbidden = ("kfp", "dvc", "kubernetes", "components", "pipelines")
    for path in Path(data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top not in forbidden, f"{path.name} imports {name}"
                assert top != "model" or name == "common.errors", f"{path.name} imports {name}"
