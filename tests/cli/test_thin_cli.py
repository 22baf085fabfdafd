"""The CLI is thin: each command parses its arguments, calls one library function and prints the result.

Rule, read with `ast` over every cli/*.py module: a command is a function named `cmd_*` (at any depth, so
decorated and nested ones count too), and its body is at most MAX_BODY_LINES lines. The body is counted from
its first statement after the docstring to the function's last line, blank lines and comments inside
included; the `def` line(s), decorators and the docstring are not. A handler a cli module defines and
registers with `set_defaults(func=...)` is named `cmd_*`, so the rule cannot be dodged by another name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "cli"
MAX_BODY_LINES = 15


def body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the function's last line."""
    body = fn.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            body = body[1:]
    return fn.end_lineno - body[0].lineno + 1


def fat_commands(source: str, filename: str = "<cli>") -> list[str]:
    """'file:line cmd_x: N lines' for every `cmd_*` function of `source` whose body is over the limit."""
    tree = ast.parse(source, filename=filename)
    return [
        f"{filename}:{node.lineno} {node.name}: {body_lines(node)} lines (at most {MAX_BODY_LINES})"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("cmd_")
        and body_lines(node) > MAX_BODY_LINES
    ]


def misnamed_handlers(source: str, filename: str = "<cli>") -> list[str]:
    """Functions `source` defines and registers as `set_defaults(func=name)` whose name is not `cmd_*`."""
    tree = ast.parse(source, filename=filename)
    defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "set_defaults":
            for kw in node.keywords:
                name = kw.value.id if kw.arg == "func" and isinstance(kw.value, ast.Name) else None
                if name in defined and not name.startswith("cmd_"):
                    found.append(f"{filename}:{node.lineno} registers {name}")
    return found


def cli_modules() -> list[Path]:
    return sorted(CLI.glob("*.py"))


def test_every_command_body_is_at_most_15_lines():
    found = [v for path in cli_modules() for v in fat_commands(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == []


def test_every_handler_a_cli_module_registers_is_a_cmd_function():
    found = [
        v for path in cli_modules() for v in misnamed_handlers(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert found == []


def test_the_rule_sees_the_commands():
    """Not vacuous: the commands of every layer are found and measured."""
    names = set()
    for path in cli_modules():
        tree = ast.parse(path.read_text())
        names |= {
            n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("cmd_")
        }
    assert {
        "cmd_prepare",
        "cmd_upload",
        "cmd_train",
        "cmd_evaluate",
        "cmd_sample",
        "cmd_export_onnx",
    } <= names
    assert {"cmd_publish", "cmd_init", "cmd_compile"} <= names


def _command(body_statements: int, docstring: bool = False) -> str:
    doc = '    """What it does.\n\n    More about it.\n    """\n' if docstring else ""
    lines = "".join(f"    x{i} = {i}\n" for i in range(body_statements - 1))
    return f"def cmd_fat(\n    args,\n):\n{doc}{lines}    return 0\n"


@pytest.mark.parametrize(
    ("source", "fat"),
    [
        (_command(15), False),
        (_command(16), True),
        (_command(15, docstring=True), False),  # the docstring is not counted
        (_command(16, docstring=True), True),
        ("def helper(args):\n" + "    x = 1\n" * 40, False),  # not a command
        ("@wrap\ndef cmd_x(args):\n    '''Doc.'''\n" + "    x = 1\n" * 16, True),
        ("def register(sub):\n    def cmd_inner(args):\n" + "        x = 1\n" * 16, True),
        ("def cmd_gap(args):\n    x = 1\n" + "\n    # a comment\n" * 7 + "    return 0\n", True),
    ],
)
def test_a_fat_command_is_reported(source, fat):
    found = fat_commands(source)
    assert bool(found) is fat, found
    if fat:
        assert "cmd_" in found[0] and f"at most {MAX_BODY_LINES}" in found[0]


def test_a_handler_with_another_name_is_reported():
    source = (
        "from serving.__main__ import run as serve\n"
        "def run(args):\n    return 0\n"
        "def cmd_ok(args):\n    return 0\n"
        "def register(sub):\n"
        "    sub.add_parser('a').set_defaults(func=run)\n"
        "    sub.add_parser('b').set_defaults(func=cmd_ok)\n"
        "    sub.add_parser('c').set_defaults(func=serve)\n"  # defined elsewhere: that package's own command
    )
    assert misnamed_handlers(source) == ["<cli>:7 registers run"]
