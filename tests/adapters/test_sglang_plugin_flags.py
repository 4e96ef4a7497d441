"""The SGLang plugin's ``--kv-compress*`` flags on SGLang's real classes (CPU): the flags in SGLang's parser and
help, through ``prepare_server_args`` and a config file, usage errors and inconsistent or incompatible flags,
and the same settings given as keywords to the plugin's ``Engine``.
"""

from __future__ import annotations

import importlib.util
import pickle

import numpy as np
import pytest

if importlib.util.find_spec("sglang") is None:
    pytest.skip("SGLang is not installed", allow_module_level=True)

from lightkv_adapters.sglang import cpu_env  # noqa: E402

cpu_env.install()

from helpers.sglang_plugin import COMPATIBLE, COMPATIBLE_FLAGS, LIGHTKV, LIGHTKV_FLAGS, server_args_with  # noqa: E402
from sglang.srt import server_args as sglang_server_args  # noqa: E402

from lightkv_adapters.sglang.settings import (  # noqa: E402
    SETTINGS_ATTRIBUTE,
    KVCompressSettings,
    kv_compress_settings,
    settings_of,
)

# --- flags ---------------------------------------------------------------------------------------------------------


def test_help_lists_the_flags(plugins_loaded, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sglang_server_args.prepare_server_args(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "KV cache compression (lightkv)" in help_text
    assert "--kv-compress {none,lightkv,fastv}" in help_text
    for flag in ("--kv-compress-layers", "--kv-compress-windows", "--kv-compress-ratios"):
        assert flag in help_text
    assert "Needs --cuda-graph-backend-prefill disabled" in help_text
    assert "LIGHTKV_CUDA_GRAPH_DECODE=1" in " ".join(help_text.split())


def test_prepare_server_args_attaches_the_settings(plugins_loaded):
    server_args = sglang_server_args.prepare_server_args(["--model-path", "m", *COMPATIBLE_FLAGS, *LIGHTKV_FLAGS])
    assert settings_of(server_args) == LIGHTKV
    assert server_args.model_path == "m" and server_args.disable_radix_cache
    fastv = sglang_server_args.prepare_server_args(
        ["--model-path", "m", *COMPATIBLE_FLAGS, "--kv-compress", "fastv", "--kv-compress-layers", "3"]
    )
    assert settings_of(fastv) == KVCompressSettings("fastv", (3,))


def test_without_the_flag_nothing_is_compressed_or_checked(plugins_loaded):
    server_args = sglang_server_args.prepare_server_args(["--model-path", "m"])
    assert settings_of(server_args) == KVCompressSettings()
    assert getattr(server_args, SETTINGS_ATTRIBUTE) == KVCompressSettings()


def test_config_file_sets_the_flags(plugins_loaded, tmp_path):
    config = tmp_path / "server.yaml"
    config.write_text(
        "kv-compress: lightkv\nkv-compress-layers: '2,4'\nkv-compress-windows: '4,2'\nkv-compress-ratios: '0.5,0.25'\n"
        "disable-radix-cache: true\nchunked-prefill-size: -1\ncuda-graph-backend-decode: disabled\n"
        "cuda-graph-backend-prefill: disabled\ndisable-overlap-schedule: true\nattention-backend: torch_native\n"
    )
    server_args = sglang_server_args.prepare_server_args(["--model-path", "m", "--config", str(config)])
    assert settings_of(server_args) == LIGHTKV


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kv-compress", "lightkv", "--kv-compress-layers", "two"], "--kv-compress-layers takes a comma-separated"),
        (["--kv-compress", "lightkv", "--kv-compress-ratios", ","], "--kv-compress-ratios needs at least one value"),
        (["--kv-compress", "merge"], "argument --kv-compress: invalid choice: 'merge'"),
    ],
)
def test_malformed_flags_are_usage_errors(plugins_loaded, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        sglang_server_args.prepare_server_args(["--model-path", "m", *COMPATIBLE_FLAGS, *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--kv-compress-layers", "2"], "need --kv-compress lightkv or fastv"),
        (["--kv-compress", "fastv", "--kv-compress-windows", "4"], "FastV has no windows"),
        (
            ["--kv-compress", "lightkv", "--kv-compress-layers", "2,4", "--kv-compress-windows", "4,2,1"],
            "one value per",
        ),
        (["--kv-compress", "lightkv", "--kv-compress-layers", "2", "--kv-compress-ratios", "0.5,0.5"], "one value per"),
        (["--kv-compress", "lightkv", "--kv-compress-windows", "0"], r"--kv-compress-windows must be >= 1, got \(0,\)"),
        (["--kv-compress", "lightkv", "--kv-compress-ratios", "1.5"], r"ratios must lie in \[0, 1\], got \(1.5,\)"),
        (["--kv-compress", "fastv", "--kv-compress-ratios", "1.5"], r"ratios must lie in \[0, 1\], got \(1.5,\)"),
    ],
)
def test_inconsistent_flags_are_rejected(plugins_loaded, flags, message):
    with pytest.raises(ValueError, match=message):
        sglang_server_args.prepare_server_args(["--model-path", "m", *COMPATIBLE_FLAGS, *flags])


def test_incompatible_server_arguments_stop_prepare_server_args(plugins_loaded):
    with pytest.raises(ValueError, match="--kv-compress lightkv cannot run") as error:
        sglang_server_args.prepare_server_args(["--model-path", "m", "--kv-compress", "lightkv"])
    for fix in (
        "--cuda-graph-backend-decode disabled",
        "--attention-backend triton (GPU) or torch_native (CPU)",
    ):
        assert fix in str(error.value)
    # chunked prefill, the radix cache and the overlap scheduler are on by default and run
    assert all(word not in str(error.value) for word in ("chunked", "radix", "overlap"))


# --- Engine ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def engine_calls(monkeypatch) -> list[dict]:
    """What SGLang's ``Engine.__init__`` received (it launches nothing)."""
    from sglang.srt.entrypoints.engine import Engine as SGLangEngine

    calls = []
    monkeypatch.setattr(SGLangEngine, "__init__", lambda self, **kwargs: calls.append(kwargs))
    return calls


def test_engine_takes_the_kv_compress_keywords(engine_calls):
    from lightkv_adapters.sglang.engine import Engine

    Engine(
        model_path="m",
        kv_compress="lightkv",
        kv_compress_layers=[2, 4],
        kv_compress_windows="4,2",
        kv_compress_ratios=(0.5, 0.25),
        **COMPATIBLE,
    )
    (call,) = engine_calls
    assert list(call) == ["server_args"]
    server_args = call["server_args"]
    assert settings_of(server_args) == LIGHTKV
    assert server_args.model_path == "m" and server_args.log_level == "error"
    assert "kv_compress='lightkv'" in server_args.launch_command
    assert settings_of(pickle.loads(pickle.dumps(server_args))) == LIGHTKV


def test_engine_attaches_settings_to_given_server_args(engine_calls):
    from lightkv_adapters.sglang.engine import Engine, build_server_args

    Engine(server_args=server_args_with(), kv_compress="fastv", kv_compress_layers=3, kv_compress_ratios=0.25)
    assert settings_of(engine_calls[-1]["server_args"]) == KVCompressSettings("fastv", (3,), None, (0.25,))
    ready = build_server_args(model_path="m", kv_compress="fastv", **COMPATIBLE)
    Engine(server_args=ready)
    assert settings_of(engine_calls[-1]["server_args"]) == KVCompressSettings("fastv")
    with pytest.raises(TypeError, match=r"takes no other server arguments, got \['tp_size'\]"):
        Engine(server_args=ready, tp_size=2)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"kv_compress": "lightkv"}, ValueError, "pass --cuda-graph-backend-decode disabled"),
        (
            {"kv_compress": "lightkv", "kv_compress_layers": [2.5], **COMPATIBLE},
            ValueError,
            "--kv-compress-layers takes ints",
        ),
        (
            {"kv_compress": "lightkv", "kv_compress_windows": "a", **COMPATIBLE},
            ValueError,
            "--kv-compress-windows takes",
        ),
        ({"kv_compress": "zip", **COMPATIBLE}, ValueError, "--kv-compress must be one of none, lightkv, fastv"),
        ({"no_such_argument": 1}, TypeError, "no_such_argument"),
    ],
)
def test_engine_rejects_bad_arguments_before_launching(engine_calls, kwargs, error, message):
    from lightkv_adapters.sglang.engine import Engine

    with pytest.raises(error, match=message):
        Engine(model_path="m", **kwargs)
    assert engine_calls == []


# --- issue 21: the schedules' one parser -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--kv-compress-layers", "-2", "got '-2': it starts with '-'"),
        ("--kv-compress-layers", "2--4", "got '2--4': it holds '--'"),
        ("--kv-compress-layers", "2,,4", "got '2,,4': it holds an empty item"),
        ("--kv-compress-layers", "2,4,", "got '2,4,': it holds an empty item"),
        ("--kv-compress-layers", "2.5", "takes a comma-separated list of ints (or a '-'-separated one), got '2.5'"),
        ("--kv-compress-layers", "true", "got 'true': 'true' is not a non-negative integer"),
        ("--kv-compress-windows", "4,-2", "got '4,-2': '-2' is negative"),
        ("--kv-compress-ratios", "0.5,-0.25", "got '0.5,-0.25': '-0.25' is negative"),
        ("--kv-compress-ratios", "nan", "got 'nan': 'nan' is not a non-negative decimal number"),
        ("--kv-compress-ratios", "inf", "got 'inf'"),
        ("--kv-compress-pool-ratios", "0.5,-0.3", "got '0.5,-0.3': '-0.3' is negative"),
    ],
)
def test_a_flag_value_that_is_not_a_list_of_numbers_is_a_usage_error_naming_the_flag(
    plugins_loaded, capsys, flag, value, message
):
    with pytest.raises(SystemExit) as exit_info:
        sglang_server_args.prepare_server_args(
            ["--model-path", "m", *COMPATIBLE_FLAGS, "--kv-compress", "lightkv", f"{flag}={value}"]
        )
    assert exit_info.value.code == 2
    assert f"argument {flag}: {flag} " in (err := capsys.readouterr().err) and message in err, err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kv_compress_layers": [True]}, r"--kv-compress-layers takes ints, got \[True\]: True is a bool"),
        ({"kv_compress_layers": [2.0]}, r"--kv-compress-layers takes ints, got \[2.0\]: 2.0 is a float"),
        ({"kv_compress_layers": -1}, "--kv-compress-layers takes ints, got -1: -1 is negative"),
        ({"kv_compress_windows": [np.bool_(True)]}, "--kv-compress-windows takes ints, .* is a bool"),
        ({"kv_compress_ratios": [float("nan")]}, r"--kv-compress-ratios takes floats, got \[nan\]: nan is not finite"),
        ({"kv_compress_ratios": (0.5, -0.5)}, "--kv-compress-ratios takes floats, .* -0.5 is negative"),
        ({"kv_compress_ratios": "0.5-1.5"}, r"--kv-compress-ratios must lie in \[0, 1\], got \(0.5, 1.5\)"),
        ({"kv_compress_pool_ratios": [False]}, "--kv-compress-pool-ratios takes floats, .* is a bool"),
    ],
)
def test_keyword_values_are_refused_like_the_flags(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kv_compress_settings("lightkv", **kwargs)


def test_settings_built_directly_are_parsed_too():
    assert KVCompressSettings("lightkv", "2-4", 4, np.array([0.5, 0.25])) == KVCompressSettings(
        "lightkv", (2, 4), (4,), (0.5, 0.25)
    )
    with pytest.raises(ValueError, match=r"--kv-compress-layers takes ints, got \(2.7,\)"):
        KVCompressSettings("fastv", (2.7,))


@pytest.mark.parametrize(
    ("kwargs", "schedule"),
    [
        ({"kv_compress_ratios": "0.3"}, ((12, 18, 24), (4, 2, 1), (0.3, 0.3, 0.3))),
        ({"kv_compress_windows": 2, "kv_compress_ratios": 0.25}, ((12, 18, 24), (2, 2, 2), (0.25, 0.25, 0.25))),
        (
            {"kv_compress_layers": "2,4", "kv_compress_windows": "4", "kv_compress_ratios": "0.5"},
            ((2, 4), (4, 4), (0.5, 0.5)),
        ),
        (
            {"kv_compress_windows": "4,2", "kv_compress_ratios": "0.5", "kv_compress_layers": [3, 9]},
            ((3, 9), (4, 2), (0.5, 0.5)),
        ),
        (
            {"kv_compress_layers": np.array([12, 18]), "kv_compress_windows": 4, "kv_compress_ratios": np.float32(0.5)},
            ((12, 18), (4, 4), (0.5, 0.5)),
        ),
    ],
)
def test_one_window_or_ratio_applies_to_every_stage(kwargs, schedule):
    method = kv_compress_settings("lightkv", **kwargs).reduction("llava-1.5", 32)
    config = method.config
    assert (config.merge_layers, config.merge_windows, config.merge_ratios) == schedule


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"kv_compress_windows": "4,2", "kv_compress_ratios": "0.5"}, "--kv-compress-layers"),
        ({"kv_compress_layers": "12,18", "kv_compress_windows": "4"}, "--kv-compress-ratios"),
    ],
)
def test_a_preset_list_is_not_cut_to_fewer_stages(kwargs, flag):
    """Only a value given once applies to every stage; the preset's three values are not cut down to two."""
    with pytest.raises(ValueError, match=f"the llava-1.5 preset has 3 stages; give {flag} for the 2 stages"):
        kv_compress_settings("lightkv", **kwargs).reduction("llava-1.5", 32)
