"""The `lightkv` command line itself: the subcommands above the core come from the ``lightkv.commands`` entry
points, the core imports nothing above it, and only usage errors become one-line ``lightkv: error:`` messages."""

from __future__ import annotations

import ast
import contextlib
import io
import subprocess
import sys
import types
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

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


# ----------------------------------------------------------------------------------------------
# Numbers on the command line (issue 21): every one is range-checked before the work, in one line


SIMULATE = ["simulate", "--grid", "4x4", "--backend", "torch", "--hidden-size", "16"]


@pytest.fixture
def no_work(monkeypatch):
    """The simulated stages and autotune's shapes fail the test: a bad number must be refused before them."""

    def ran(*args, **kwargs):
        pytest.fail("the command started its work before refusing the value")

    monkeypatch.setattr(cli, "lightkv_stage", ran)
    monkeypatch.setattr(autotune, "preset_shapes", ran)
    monkeypatch.setattr(autotune, "parse_shape", ran)


def status_and_streams(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)``'s exit status (argparse's ``SystemExit`` included), stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exit_info:
            status = exit_info.code
    return status, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--ratios=-0.9"], "--ratios takes a comma-separated list of floats (or a '-'-separated one), got '-0.9': it"),
        (["--ratios=-0.9-0.9-0.9"], "got '-0.9-0.9-0.9': it starts with '-'"),
        (["--ratios", "0.5,-0.25,0.5"], "got '0.5,-0.25,0.5': '-0.25' is negative"),
        (["--ratios", "1.5"], "merge_ratios must lie in [0, 1], got (1.5,)"),
        (["--ratios", "nan"], "--ratios takes a comma-separated list of floats (or a '-'-separated one), got 'nan'"),
        (["--layers", "12.7-18-24"], "got '12.7-18-24': '12.7' is not a non-negative integer"),
        (["--layers", "12--18-24"], "got '12--18-24': it holds '--'"),
        (["--layers", "12,,18,24"], "got '12,,18,24': it holds an empty item"),
        (["--layers", "12-18-24-"], "got '12-18-24-': it ends with '-'"),
        (["--layers", ""], "--layers needs at least one value, got ''"),
        (["--windows", "true"], "--windows takes a comma-separated list of ints (or a '-'-separated one), got 'true'"),
        (["--layers", "40-50-60"], "--layers [40, 50, 60] lie beyond the 32-layer decoder (layers 0..31)"),
        (["--num-layers", "8", "--layers", "3-6-8"], "--layers [8] lie beyond the 8-layer decoder (layers 0..7)"),
        (["--heads", str(10**9)], "would take 14483.9 GiB, more than the 2.0 GiB lightkv simulate allows"),
        (["--head-dim", str(10**9)], "more than the 2.0 GiB lightkv simulate allows"),
        (["--grid", "100000x100000"], "ask for 10000000065 tokens, more than the 1048576 lightkv simulate generates"),
        (["--text-before", str(10**8)], "more than the 1048576 lightkv simulate generates"),
        (["--images", "100000"], "ask for 1700064 tokens, more than the 1048576 lightkv simulate generates"),
        (["--num-layers", str(10**9)], "argument --num-layers: expected an integer <= 4096, got '1000000000'"),
        (["--num-layers", "0"], "argument --num-layers: expected an integer >= 1, got '0'"),
        (["--images", "0"], "argument --images: expected an integer >= 1, got '0'"),
        (["--heads", "0"], "argument --heads: expected an integer >= 1, got '0'"),
        (["--head-dim", "0"], "argument --head-dim: expected an integer >= 1, got '0'"),
        (["--heads", "2.0"], "argument --heads: expected an integer, got '2.0'"),
        (["--seed", str(2**64)], "argument --seed: expected an integer <= 18446744073709551615"),
    ],
)
def test_simulate_refuses_a_bad_number_in_one_line_before_any_stage(options, message, no_work):
    status, out, err = status_and_streams([*SIMULATE, *options])
    assert (status, out) == (2, "")
    assert err.startswith("lightkv: error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    "options, schedule",
    [
        (["--ratios", "0.3"], "layers (12, 18, 24), windows (4, 2, 1), ratios (0.3, 0.3, 0.3)"),
        (["--windows", "2", "--ratios", "0.25"], "windows (2, 2, 2), ratios (0.25, 0.25, 0.25)"),
        (["--layers", "2,5", "--windows", "1", "--ratios", "0.5"], "layers (2, 5), windows (1, 1), ratios (0.5, 0.5)"),
        (["--num-layers", "8", "--layers", "3-6-7"], "layers (3, 6, 7), windows (4, 2, 1)"),
    ],
)
def test_simulate_applies_one_window_or_ratio_to_every_stage(options, schedule):
    status, out, _ = status_and_streams([*SIMULATE, *options])
    assert status == 0 and schedule in out.splitlines()[1]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--text-tokens", "0"], "--text-tokens must lie in 1..1048576, got 0"),
        (["--text-tokens", "-5"], "--text-tokens must lie in 1..1048576, got -5"),
        (["--text-tokens", str(10**12)], "--text-tokens must lie in 1..1048576, got 1000000000000"),
        (["--shape", f"S={10**12}"], "--shape 'S=1000000000000': 'S=1000000000000' is not an integer in 1..1048576"),
        (["--shape", "S=\u00b2"], "--shape 'S=\u00b2': 'S=\u00b2' is not an integer in 1..1048576"),
        (["--max-configs", "0"], "--max-configs must be at least 1, got 0"),
        (["--max-configs", "1.5"], "argument --max-configs: invalid int value: '1.5'"),
    ],
)
def test_autotune_refuses_a_bad_number_in_one_line_before_any_shape(options, message, no_work):
    status, out, err = status_and_streams(["autotune", "--dry-run", *options])
    assert (status, out) == (2, "")
    assert err.startswith("lightkv: error: ") and err.count("\n") == 1 and message in err, err


CLI_NUMBERS = st.one_of(
    st.integers(-3, 40).map(str),
    st.floats(-1, 2).map(repr),
    st.integers(10**9, 10**30).map(str),
    st.sampled_from(["", " ", "nan", "inf", "-0", "1e3", "1.5", "0x10", "true", "3 4"]),
)
SCHEDULES = st.builds(
    lambda items, sep: sep.join(items), st.lists(CLI_NUMBERS, max_size=4), st.sampled_from([",", "-"])
)


def joined(items: st.SearchStrategy) -> st.SearchStrategy[str]:
    """``items`` (a strategy of lists) written with either separator."""
    return st.builds(lambda values, sep: sep.join(map(str, values)), items, st.sampled_from([",", "-"]))


def mostly(valid: st.SearchStrategy[str], anything: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A value a run takes three times in four, else anything: enough runs get through to the stages."""
    return st.integers(0, 3).flatmap(lambda draw: valid if draw else anything)


FLAGS = {
    "--layers": mostly(
        joined(st.lists(st.integers(0, 23), min_size=3, max_size=3, unique=True).map(sorted)), SCHEDULES
    ),
    "--windows": mostly(joined(st.lists(st.integers(1, 4), min_size=1, max_size=1)), SCHEDULES),
    "--ratios": mostly(joined(st.lists(st.floats(0, 1), min_size=3, max_size=3)), SCHEDULES),
    "--num-layers": mostly(st.integers(24, 64).map(str), CLI_NUMBERS),
    "--images": mostly(st.integers(1, 2).map(str), CLI_NUMBERS),
    "--heads": mostly(st.sampled_from(["1", "2", "4"]), CLI_NUMBERS),
    "--head-dim": mostly(st.integers(1, 64).map(str), CLI_NUMBERS),
}


@settings(max_examples=25, deadline=None)
@given(st.fixed_dictionaries({}, optional=FLAGS))
def test_simulate_with_any_numbers_runs_or_is_one_usage_line(options: dict[str, str]):
    status, out, err = status_and_streams([*SIMULATE, *(f"{flag}={value}" for flag, value in options.items())])
    event(f"exit status {status}")
    if status == 0:
        assert "per-layer KV tokens" in out and "Traceback" not in err
    else:
        assert (status, out) == (2, "")
        assert err.startswith("lightkv: error: ") and err.count("\n") == 1, err
