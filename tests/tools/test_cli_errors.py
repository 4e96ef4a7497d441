"""A user's mistake on the ``lightkv`` command line is one ``lightkv: error:`` line with exit status 2, found before
any long run, and results go to the results folder (``$LIGHTKV_RESULTS_DIR``), never into the checkout unless
``--out`` says so (issue 21).

Every command is called in process through :func:`lightkv_core.cli.main`, as the other CLI tests do. Where a
mistake must be caught before the work starts, the work is replaced by a function that fails the test: the
checks are cheap, and a check that came too late fails at once instead of after a benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightkv_adapters.reference import quality
from lightkv_adapters.reference.tiny_lvlm import WEIGHTS, TinyLVLM, WeightsError
from lightkv_core import autotune
from lightkv_core.cli import main
from lightkv_core.kernels.tuning import TuningCacheError, TuningCacheWarning, cache_path
from lightkv_core.run_record import output_dir, results_dir
from lightkv_perf import kernels, prefill, scoring

CHECKOUT = Path(__file__).resolve().parents[2]
SCORING = ["bench", "scoring", "--quick", "--seq-lengths", "48", "--guide-tokens", "8", "--heads", "2"]
KERNELS = ["bench", "kernels", "--quick", "--prompts", "llava-1.5", "--hidden", "32", "--repeats", "1"]
PREFILL = ["bench", "prefill", "--size", "tiny", "--quick", "--backend", "torch", "--vision-tokens", "144"]
EVAL = ["eval", "--per-type", "1", "--methods", "fastv", "--retentions", "0.5"]


@pytest.fixture(autouse=True)
def folders(tmp_path, monkeypatch):
    """The results folder and the tuning cache in this test's own folder: nothing lands in the checkout or ~."""
    monkeypatch.setenv("LIGHTKV_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("LIGHTKV_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def no_work(monkeypatch):
    """Every long part of the commands fails the test: a mistake must be refused before any of it runs."""

    def ran(*args, **kwargs):
        pytest.fail("the command started its work before refusing the mistake")

    for module, name in [
        (scoring, "measure"),
        (kernels, "build_cases"),
        (prefill, "measure"),
        (quality, "score"),
        (TinyLVLM, "answer"),
        (autotune, "compile_all"),
    ]:
        monkeypatch.setattr(module, name, ran)


def one_error_line(capsys) -> str:
    """The command's stderr, checked to be a single ``lightkv: error:`` line without a traceback."""
    err = capsys.readouterr().err
    assert err.startswith("lightkv: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


# ----------------------------------------------------------------------------------------------
# Numeric flags


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--batch", "0"],
        ["demo", "--per-type", "0"],
        ["demo", "--per-type", "-1"],
        ["demo", "--show", "0"],
        ["eval", "--batch", "0"],
        ["eval", "--per-type", "-1"],
        ["calibrate", "--batch", "0"],
    ],
)
def test_counts_below_one_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "expected an integer >= 1" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["calibrate", "--prompts", "-1"], "--prompts must be >= 1"),
        (["calibrate", "--sink", "-1"], "sink must be >= 0"),
        (["calibrate", "--retention", "nan"], "retention must lie in [0, 1]"),
        (["calibrate", "--retention", "1.5"], "retention must lie in [0, 1]"),
        ([*EVAL[:-1], "1.5"], "--retentions: expected comma-separated numbers in [0, 1]"),
        ([*EVAL[:-1], "-0.2"], "--retentions: expected comma-separated numbers in [0, 1]"),
        ([*EVAL[:-1], "nan"], "--retentions: expected comma-separated numbers in [0, 1]"),
        ([*EVAL[:-1], "0.5,0.5"], "--retentions: the targets must differ"),
        (["eval", "--methods", "fastv,nope"], "--methods: unknown 'nope'"),
        ([*SCORING, "--repeats", "0"], "--repeats must be at least 1, got 0"),
        ([*SCORING, "--repeats", "-1"], "--repeats must be at least 1, got -1"),
        ([*KERNELS, "--threads", "-1"], "--threads must be at least 0"),
        ([*KERNELS, "--threads", "100000000"], "--threads must be at most"),
        ([*PREFILL, "--repeats", "0"], "--repeats must be at least 1, got 0"),
    ],
)
def test_out_of_range_values_are_one_usage_line_before_any_work(argv, message, no_work, tmp_path, capsys):
    assert main(argv) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


# ----------------------------------------------------------------------------------------------
# --weights


@pytest.fixture(scope="module")
def bad_weights(tmp_path_factory) -> dict[str, Path]:
    """Files that are no tiny-LVLM weights, by what is wrong with them."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("weights")
    shipped = WEIGHTS.read_bytes()
    with safe_open(str(WEIGHTS), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(WEIGHTS))
    files = {"missing": folder / "missing.safetensors", "folder": folder}
    for name, content in [("truncated", shipped[:1000]), ("cut", shipped[:20_000]), ("text", b"hello\n")]:
        files[name] = folder / f"{name}.safetensors"
        files[name].write_bytes(content)
    files["no metadata"] = folder / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(files["no metadata"]))
    files["other tensors"] = folder / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(files["other tensors"]), metadata=metadata)
    files["wrong shape"] = folder / "shape.safetensors"
    save_file({**tensors, "projector.bias": torch.zeros(7)}, str(files["wrong shape"]), metadata=metadata)
    files["bad config"] = folder / "config.safetensors"
    save_file(tensors, str(files["bad config"]), metadata={"decoder_config": json.dumps({"nope": 1})})
    return files


@pytest.mark.parametrize(
    "kind, problem",
    [
        ("missing", "no such file"),
        ("folder", "a folder"),
        ("truncated", "not a safetensors file"),
        ("cut", "not a safetensors file"),
        ("text", "not a safetensors file"),
        ("no metadata", "without lightkv's 'decoder_config' metadata"),
        ("other tensors", "its tensors do not match its decoder_config (missing decoder."),
        ("wrong shape", "shape of projector.bias (7,) instead of (128,)"),
        ("bad config", "is not a decoder config"),
    ],
)
def test_demo_with_unusable_weights_names_the_file_and_the_fix(bad_weights, kind, problem, no_work, capsys):
    path = bad_weights[kind]
    assert main(["demo", "--weights", str(path)]) == 2
    err = one_error_line(capsys)
    assert f"--weights: {'no tiny-LVLM weights at ' if kind in ('missing', 'folder') else ''}{path}" in err
    assert problem in err
    assert "lightkv_adapters.reference.train --out" in err and "omit --weights for the shipped weights" in err


@pytest.mark.parametrize("command", [["eval"], ["calibrate", "--prompts", "1"]])
def test_eval_and_calibrate_refuse_unusable_weights_too(bad_weights, command, no_work, capsys):
    assert main([*command, "--weights", str(bad_weights["truncated"])]) == 2
    assert "not a safetensors file" in one_error_line(capsys)


def test_loading_unusable_weights_from_python_is_a_weights_error(bad_weights):
    with pytest.raises(WeightsError, match="is not tiny-LVLM weights: a safetensors file without") as error:
        TinyLVLM.load(bad_weights["no metadata"])
    assert isinstance(error.value, ValueError) and str(bad_weights["no metadata"]) in str(error.value)


# ----------------------------------------------------------------------------------------------
# The tuning cache


@pytest.mark.parametrize("kind", ["binary", "folder is a file"])
def test_an_unusable_tuning_cache_warns_once_and_inference_runs_on_the_defaults(kind, tmp_path, monkeypatch, capsys):
    if kind == "binary":
        cache_path("cpu").parent.mkdir(parents=True)
        cache_path("cpu").write_bytes(b"\xff\xfe\x00 not json")
        named = str(cache_path("cpu"))
    else:
        (tmp_path / "a file").write_text("")
        monkeypatch.setenv("LIGHTKV_CACHE_DIR", str(tmp_path / "a file"))
        named = str(tmp_path / "a file")
    with pytest.warns(TuningCacheWarning) as warned:
        assert main(["simulate", "--preset", "llava-1.5", "--grid", "4x4", "--images", "1"]) == 0
    assert "per-layer KV tokens" in capsys.readouterr().out
    messages = [str(w.message) for w in warned if w.category is TuningCacheWarning]
    assert len(set(messages)) == 1 and named in messages[0] and "default configs" in messages[0]


def test_writing_into_an_unusable_tuning_cache_is_one_usage_error(tmp_path, monkeypatch):
    from lightkv_core.kernels.tuning import KERNELS as TUNABLE
    from lightkv_core.kernels.tuning import store_configs

    spec = TUNABLE["merge_compact"]
    entries = {"merge_compact": {spec.key(D=64, dtype="float32"): {"config": dict(spec.default)}}}
    cache_path("cpu").parent.mkdir(parents=True)
    cache_path("cpu").write_bytes(b"\xff\xfe")
    with pytest.raises(TuningCacheError, match="cannot be read \\(not UTF-8 text\\); delete it"):
        store_configs("cpu", "test", entries)
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("LIGHTKV_CACHE_DIR", str(tmp_path / "a file"))
    with pytest.raises(TuningCacheError, match="is a file, not a folder; point LIGHTKV_CACHE_DIR at a folder"):
        store_configs("cpu", "test", entries)


# ----------------------------------------------------------------------------------------------
# Output folders: checked before the run


def _destinations(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "a file").write_text("")
    return {"a file": str(tmp_path / "a file"), "under a file": str(tmp_path / "a file" / "out")}


COMPILE_ONLY = [
    "autotune",
    "--compile-only",
    "--target",
    "sm_90",
    "--kernels",
    "merge_compact",
    "--preset",
    "llava-1.5",
]


@pytest.mark.parametrize("where, message", [("a file", "is a file, not a folder"), ("under a file", "cannot write")])
@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(SCORING, id="scoring"),
        pytest.param(KERNELS, id="kernels"),
        pytest.param(PREFILL, id="prefill"),
        pytest.param(["bench", "all", "--quick"], id="all"),
        pytest.param(EVAL, id="eval"),
        pytest.param(
            COMPILE_ONLY,
            id="compile-only",
        ),
    ],
)
def test_an_output_folder_that_cannot_be_written_is_refused_before_the_run(
    argv, where, message, no_work, tmp_path, capsys
):
    out = _destinations(tmp_path)[where]
    assert main([*argv, "--out", out]) == 2
    err = one_error_line(capsys)
    assert f"--out {out}" in err and message in err and "pass --out a folder you can write to" in err


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_calibrate_checks_its_output_file_before_the_run(where, no_work, tmp_path, capsys):
    out = Path(_destinations(tmp_path)[where]) / "calibration.json"
    assert main(["calibrate", "--prompts", "1", "--out", str(out)]) == 2
    assert f"--out {out.parent}" in one_error_line(capsys)
    assert main(["calibrate", "--prompts", "1", "--out", str(tmp_path)]) == 2
    assert "is a folder; pass --out a file name" in one_error_line(capsys)


def test_a_results_folder_variable_naming_a_file_is_one_usage_error(no_work, tmp_path, monkeypatch, capsys):
    (tmp_path / "a file").write_text("")
    monkeypatch.setenv("LIGHTKV_RESULTS_DIR", str(tmp_path / "a file"))
    assert main(SCORING) == 2
    assert f"LIGHTKV_RESULTS_DIR={tmp_path / 'a file'} is a file" in one_error_line(capsys)


# ----------------------------------------------------------------------------------------------
# Where results go


def test_the_results_folder_is_the_variable_else_the_user_cache_never_the_checkout(tmp_path, monkeypatch):
    assert results_dir() == tmp_path / "results"
    monkeypatch.delenv("LIGHTKV_RESULTS_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert results_dir() == tmp_path / "home" / ".cache" / "lightkv" / "results"
    assert output_dir(None).is_dir()


@pytest.mark.parametrize("argv", [["bench", "scoring"], ["bench", "all"], ["eval"], ["calibrate"]], ids=" ".join)
def test_the_help_names_the_results_folder_and_no_folder_of_the_checkout(argv, capsys):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "$LIGHTKV_RESULTS_DIR, else ~/.cache/lightkv/results" in out
    assert str(CHECKOUT) not in out and "perf/results" not in out


def test_results_go_to_the_results_folder_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*SCORING, "--head-dim", "16"]) == 0
    assert (tmp_path / "results" / "scoring-cpu.json").is_file()
    assert main(["calibrate", "--prompts", "1", "--batch", "1", "--backend", "torch"]) == 0
    assert (tmp_path / "results" / "prefixkv-calibration.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["results"]  # nothing in the working folder


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch", "0"], "--batch: expected an integer >= 1"),
        (["--lr", "nan"], "--lr: expected a finite number > 0.0"),
        (["--phases", "2:10,3"], "--phases: each phase is cells:steps"),
        (["--phases", "2:10"], "the last phase must train on the full 4x4 layout"),
        (["--out", "/proc/forbidden/w.safetensors"], "--out /proc/forbidden: cannot write there"),
    ],
)
def test_training_options_are_checked_before_training(argv, message, monkeypatch, capsys):
    from lightkv_adapters.reference import train

    monkeypatch.setattr(train, "TinyLVLM", lambda: pytest.fail("training started"))
    with pytest.raises(SystemExit) as exit_:
        train.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_training_writes_to_the_results_folder_by_default(tmp_path):
    from lightkv_adapters.reference import train
    from lightkv_adapters.reference.tiny_lvlm import WEIGHTS

    shipped = WEIGHTS.stat().st_mtime_ns
    assert train.main(["--phases", "4:1", "--batch", "2"]) == 0
    assert (tmp_path / "results" / "tiny-lvlm.safetensors").is_file()
    assert WEIGHTS.stat().st_mtime_ns == shipped
