"""The `lightkv` command line itself: the subcommands above the core come from the ``lightkv.commands`` entry
points, the core imports nothing above it, and only usage errors become one-line ``lightkv: error:`` messages."""

from __future__ import annotations

import ast
import subprocess
import sys
import types
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest

from lightkv_core import autotune, cli
from lightkv_core.cli import Command, CommandLoadError, load_commands, main
from lightkv_core.errors import UsageError

CORE = Path(cli.__file__).parent
ORDER = ["simulate", "presets", "autotune", "demo", "eval", "bench", "calibrate"]
PLUGIN = "lightkv_test_plugin"


def _hello_arguments(parser):
    parser.add_argument("--fail", choices=["usage", "value", "type"])


def _deep_in_a_benchmark(kind: str) -> None:
    raise {"value": ValueError, "type": TypeError}[kind](f"a {kind} bug deep in a benchmark")


def _hello(args) -> int:
    if args.fail == "usage":
        raise UsageError("--fail: a bad value")
    if args.fail:
        _deep_in_a_benchmark(args.fail)
    print("hello")
    return 0


@pytest.fixture
def plugins(monkeypatch):
    """``plugins(*entry_points)``: the installed ``lightkv.commands`` entry points and these, which may name
    attributes of the module ``lightkv_test_plugin`` (``HELLO``: a command ``hello``; ``NOT_A_COMMAND``)."""
    module = types.ModuleType(PLUGIN)
    module.HELLO = Command("hello", "say hello", _hello_arguments, _hello)
    module.NOT_A_COMMAND = object()
    monkeypatch.setitem(sys.modules, PLUGIN, module)
    installed = list(entry_points(group=cli.ENTRY_POINT_GROUP))

    def install(*extra: EntryPoint) -> None:
        monkeypatch.setattr(
            cli, "entry_points", lambda group: [*installed, *extra] if group == cli.ENTRY_POINT_GROUP else []
        )

    return install


def point(name: str, value: str) -> EntryPoint:
    return EntryPoint(name, value, cli.ENTRY_POINT_GROUP)


def test_the_installed_entry_points_give_every_command_in_order(capsys):
    names = {ep.name: ep.value.split(".")[0] for ep in entry_points(group=cli.ENTRY_POINT_GROUP)}
    assert names == {
        "demo": "lightkv_adapters",
        "eval": "lightkv_adapters",
        "calibrate": "lightkv_adapters",
        "bench": "lightkv_perf",
    }
    assert [command.name for command in load_commands()] == ORDER
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "{" + ",".join(ORDER) + "}" in capsys.readouterr().out


def test_the_core_imports_nothing_above_it():
    above = ("lightkv_adapters", "lightkv_perf", "tests")
    for path in sorted(CORE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                modules = [node.module or ""]
            else:
                continue
            upward = [m for m in modules if m.split(".")[0] in above]
            assert not upward, f"{path.relative_to(CORE.parent)}:{node.lineno} imports {upward}"


def test_a_plugin_command_is_found_and_listed_after_the_shipped_ones(plugins, capsys):
    plugins(point("hello", f"{PLUGIN}:HELLO"))
    assert [command.name for command in load_commands()] == [*ORDER, "hello"]
    assert main(["hello"]) == 0
    assert capsys.readouterr().out == "hello\n"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "{" + ",".join([*ORDER, "hello"]) + "}" in capsys.readouterr().out


def test_a_usage_error_is_one_line_and_exit_status_2(plugins, capsys):
    plugins(point("hello", f"{PLUGIN}:HELLO"))
    assert main(["hello", "--fail", "usage"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "lightkv: error: --fail: a bad value\n" and captured.out == ""


@pytest.mark.parametrize("kind, error", [("value", ValueError), ("type", TypeError)])
def test_any_other_exception_keeps_its_traceback(plugins, kind, error):
    plugins(point("hello", f"{PLUGIN}:HELLO"))
    with pytest.raises(error, match=f"a {kind} bug deep in a benchmark") as error_info:
        main(["hello", "--fail", kind])
    assert error_info.traceback[-1].name == "_deep_in_a_benchmark"


@pytest.mark.parametrize(
    "extra, message",
    [
        ([point("simulate", f"{PLUGIN}:HELLO")], "two lightkv commands are named 'simulate': lightkv_core.cli"),
        (
            [point("hello", f"{PLUGIN}:HELLO"), point("hello", f"{PLUGIN}:HELLO")],
            f"two lightkv commands are named 'hello': entry point hello = {PLUGIN}:HELLO",
        ),
        ([point("hola", f"{PLUGIN}:HELLO")], "loads the command 'hello', not 'hola'"),
        ([point("odd", f"{PLUGIN}:NOT_A_COMMAND")], "is not a lightkv_core.cli.Command"),
    ],
)
def test_clashing_or_malformed_entry_points_are_refused(plugins, extra, message):
    plugins(*extra)
    with pytest.raises(CommandLoadError, match=message):
        main(["presets"])


def test_an_entry_point_that_fails_to_import_is_named_with_its_error(plugins):
    plugins(point("broken", "lightkv_no_such_module:COMMAND"))
    with pytest.raises(CommandLoadError) as error_info:
        main(["presets"])
    message = str(error_info.value)
    assert "entry point broken = lightkv_no_such_module:COMMAND (group lightkv.commands)" in message
    assert "failed to load: ModuleNotFoundError: No module named 'lightkv_no_such_module'" in message
    assert isinstance(error_info.value.__cause__, ModuleNotFoundError)


def test_autotune_option_errors_are_usage_errors_but_deeper_ones_are_not(monkeypatch, capsys):
    assert main(["autotune", "--kernels", "nope"]) == 2  # autotune.run raises UsageError for its options
    err = capsys.readouterr().err
    assert err.startswith("lightkv: error: unknown kernel(s) ['nope']") and err.count("\n") == 1

    def broken() -> bool:
        raise ValueError("a kernel's bug")

    monkeypatch.setattr(autotune, "interpreting", broken)  # a ValueError from inside the command, not its options
    with pytest.raises(ValueError, match="a kernel's bug"):
        main(["autotune"])


def test_python_m_runs_the_commands_of_the_entry_points():
    """``python -m lightkv_core.cli`` (autotune --dry-run re-executes it) finds the same commands, and a usage
    error raised by an adapter's command is one line."""
    result = subprocess.run(
        [sys.executable, "-m", "lightkv_core.cli", "calibrate", "--prompts", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        2,
        "",
        "lightkv: error: --prompts must be >= 1, got 0\n",
    )
