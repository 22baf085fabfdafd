"""cli.main's contract: the product's own errors and OS errors about a file are one line and exit 2; any
other exception is a bug and keeps its traceback."""

import sys
import types

import pytest

import cli.main
from common.errors import ConfigError, DataError


def _with_command(monkeypatch, raise_it):
    """`nvae boom` raises what `raise_it()` raises."""
    module = types.ModuleType("nvae_test_boom")

    def register(sub):
        sub.add_parser("boom").set_defaults(func=lambda args: raise_it())

    module.register = register
    monkeypatch.setitem(sys.modules, "nvae_test_boom", module)
    monkeypatch.setattr(cli.main, "_COMMAND_MODULES", (*cli.main._COMMAND_MODULES, "nvae_test_boom"))


@pytest.mark.parametrize(
    "exc, line",
    [
        (ConfigError("steps=0 is out of range; allowed steps >= 1"), "steps=0 is out of range"),
        (DataError("data/test.npy: sha256 mismatch"), "data/test.npy: sha256 mismatch"),
        (FileNotFoundError(2, "No such file or directory", "/no/such.pt"), "/no/such.pt: No such file"),
        (PermissionError(13, "Permission denied", "/ro/out.json"), "/ro/out.json: Permission denied"),
    ],
)
def test_input_errors_are_one_line_and_exit_2(monkeypatch, capsys, exc, line):
    def boom():
        raise exc

    _with_command(monkeypatch, boom)
    assert cli.main.main(["boom"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nvae boom: error: ") and line in err


@pytest.mark.parametrize(
    "exc",
    [ValueError("could not broadcast"), KeyError("w"), TypeError("bad operand"), OSError("socket closed")],
)
def test_a_bug_keeps_its_traceback(monkeypatch, exc):
    def boom():
        raise exc

    _with_command(monkeypatch, boom)
    with pytest.raises(type(exc)):
        cli.main.main(["boom"])
