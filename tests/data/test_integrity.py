"""Prepared data is verified where it is read: each split against the manifest's SHA-256 (once per file
version), and the split's file must lie inside the prepared folder. `--no-verify` skips the hash."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from cli.main import main
from common.errors import DataError
from data import loaders
from data.loaders import load_split


@pytest.fixture
def copy(fmnist64, tmp_path, monkeypatch):
    """A copy of the prepared folder to damage, with NVAE_NO_VERIFY unset."""
    monkeypatch.delenv(loaders.NO_VERIFY_ENV, raising=False)
    out = tmp_path / "data"
    shutil.copytree(fmnist64, out)
    return out


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _evaluate(capsys, data: Path, tmp_path: Path, *extra: str) -> tuple[int, str]:
    from model.checkpoint import save_checkpoint
    from model.config import apply_overrides, get_preset
    from model.network import NVAE

    ckpt = tmp_path / "c.pt"
    tiny = {"channels": 8, "z_channels": 4, "groups": 2, "cells_enc": 1, "cells_dec": 1, "pre_cells": 1,
            "post_cells": 1}  # fmt: skip
    save_checkpoint(ckpt, NVAE(apply_overrides(get_preset("fmnist-cpu"), tiny)))
    argv = ["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--iw-samples", "1", "--limit", "4"]
    try:
        rc = main([*argv, "--out", str(tmp_path / "m.json"), *extra])
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err


def test_a_changed_byte_is_refused_naming_the_file_and_no_verify_reads_it(copy, tmp_path, capsys):
    with open(copy / "test.npy", "r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 0xFF]))
    rc, err = _evaluate(capsys, copy, tmp_path)
    line = err.strip().splitlines()[-1]
    assert rc == 2 and f"{copy / 'test.npy'}: sha256" in line and "--no-verify" in line
    assert not (tmp_path / "m.json").exists()
    rc, err = _evaluate(capsys, copy, tmp_path, "--no-verify")
    assert rc == 0, err
    # --no-verify held for that command only: the next one in this process checks again
    assert loaders.NO_VERIFY_ENV not in os.environ
    rc, err = _evaluate(capsys, copy, tmp_path)
    assert rc == 2 and f"{copy / 'test.npy'}: sha256" in err.strip().splitlines()[-1]


def test_unverified_sets_the_variable_for_the_block_only(monkeypatch):
    monkeypatch.setenv(loaders.NO_VERIFY_ENV, "0")
    with loaders.unverified():
        assert os.environ[loaders.NO_VERIFY_ENV] == "1"
    assert os.environ[loaders.NO_VERIFY_ENV] == "0"  # put back as it was
    monkeypatch.delenv(loaders.NO_VERIFY_ENV)
    with pytest.raises(RuntimeError), loaders.unverified():
        raise RuntimeError
    assert loaders.NO_VERIFY_ENV not in os.environ
    with loaders.unverified(False):
        assert loaders.NO_VERIFY_ENV not in os.environ


@pytest.mark.parametrize("recorded", ["", "0" * 64, None, 42])
def test_a_missing_or_wrong_recorded_hash_is_refused(copy, recorded):
    manifest = _manifest(copy)
    if recorded is None:
        del manifest["splits"]["test"]["sha256"]
    else:
        manifest["splits"]["test"]["sha256"] = recorded
    _write_manifest(copy, manifest)
    with pytest.raises(DataError, match="test.npy"):
        load_split(copy, "test")


@pytest.mark.parametrize("name", ["../outside.npy", "/etc/passwd", "sub/../../x.npy"])
def test_a_split_file_outside_the_folder_is_refused(copy, name):
    manifest = _manifest(copy)
    manifest["splits"]["test"]["file"] = name
    _write_manifest(copy, manifest)
    with pytest.raises(DataError, match="leaves the prepared folder"):
        load_split(copy, "test", verify=False)


def test_a_link_out_of_the_folder_is_refused(copy, tmp_path):
    outside = tmp_path / "elsewhere.npy"
    shutil.copy(copy / "test.npy", outside)
    (copy / "test.npy").unlink()
    (copy / "test.npy").symlink_to(outside)
    with pytest.raises(DataError, match="leaves the prepared folder"):
        load_split(copy, "test")


@pytest.mark.parametrize("splits", [["test.npy"], {"test": "test.npy"}])
def test_split_entries_of_the_wrong_type_are_one_error(copy, splits):
    manifest = _manifest(copy)
    manifest["splits"] = splits
    _write_manifest(copy, manifest)
    with pytest.raises(DataError):
        load_split(copy, "test")


def test_a_verified_file_is_not_hashed_again_even_in_a_new_process(copy, monkeypatch):
    import common.files

    calls = []
    real = common.files.file_sha256
    monkeypatch.setattr(common.files, "file_sha256", lambda p: calls.append(p) or real(p))
    load_split(copy, "train")
    load_split(copy, "train")
    assert len(calls) == 1
    loaders._VERIFIED.clear()  # as a restarted process: only the cache file remembers
    load_split(copy, "train")
    assert len(calls) == 1
    (copy / "train.npy").touch()  # a new version of the file (its mtime): hashed again
    load_split(copy, "train")
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (lambda m: [m], "manifest: expected a JSON object, got list"),
        (lambda m: {**m, "bits": "eight"}, 'bits: expected an integer from 1 to 8, got "eight"'),
        (lambda m: {**m, "bits": True}, "bits: expected an integer from 1 to 8, got true"),
        (lambda m: {**m, "shape": [28, 28]}, "shape: expected [height, width, channels]"),
        (lambda m: {**m, "dataset": 3}, "dataset: expected a name, got 3"),
        (lambda m: {**m, "binarize": "yes"}, 'binarize: expected true or false, got "yes"'),
        (lambda m: {**m, "splits": {"test": "test.npy"}}, "splits.test: expected a mapping with file"),
        (lambda m: {**m, "splits": {"test": {**m["splits"]["test"], "count": False}}}, "splits.test.count"),
    ],
)
def test_a_manifest_of_the_wrong_types_is_one_line_exit_2_naming_the_field(
    copy, tmp_path, capsys, damage, says
):
    _write_manifest(copy, damage(_manifest(copy)))
    rc, err = _evaluate(capsys, copy, tmp_path)
    line = err.strip()
    assert rc == 2 and "\n" not in line, err
    assert f"{copy / 'manifest.json'}: {says}" in line
    assert not (tmp_path / "m.json").exists()


def test_a_manifest_that_is_not_json_is_one_line_with_its_position(copy, tmp_path, capsys):
    (copy / "manifest.json").write_text('{"dataset": "fashion-mnist",\n "bits": 8,,}')
    rc, err = _evaluate(capsys, copy, tmp_path)
    assert rc == 2 and f"{copy / 'manifest.json'}:2:12: not valid JSON" in err.strip()
