"""The SGLang plugin on SGLang's real classes (CPU): the entry point run by SGLang's ``load_plugins``, the
``--kv-compress*`` flags through ``prepare_server_args``, the settings riding a pickled ``ServerArgs`` into
spawned processes, the model registry resolving the plugin's classes, every compatibility check, the ``Engine``
keywords and the fallback launcher's setup.

The spawned processes stand in for SGLang's scheduler: one loads the plugin as SGLang does, the other is
spawned by the fallback launcher with the plugin filtered out by ``SGLANG_PLUGINS``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import multiprocessing
import os
import pickle
import sys
import types
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from importlib.metadata import entry_points

import pytest

if importlib.util.find_spec("sglang") is None:
    pytest.skip("SGLang is not installed", allow_module_level=True)

from lightkv_adapters.sglang import cpu_env  # noqa: E402

cpu_env.install()

from sglang.srt import server_args as sglang_server_args  # noqa: E402
from sglang.srt.plugins import load_plugins  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402

from lightkv_adapters.sglang import launch_server, plugin, routing  # noqa: E402
from lightkv_adapters.sglang.settings import SETTINGS_ATTRIBUTE, KVCompressSettings, settings_of  # noqa: E402
from lightkv_adapters.sglang.validation import validate  # noqa: E402

#: The plugin's architectures and the module of its class for each.
ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": "lightkv_adapters.sglang.models.qwen_vl",
    "Qwen2_5_VLForConditionalGeneration": "lightkv_adapters.sglang.models.qwen_vl",
    "LlavaLlamaForCausalLM": "lightkv_adapters.sglang.models.llava",
    "LlavaQwenForCausalLM": "lightkv_adapters.sglang.models.llava",
}
#: Server arguments compression runs with, as flags and as ``ServerArgs`` fields.
COMPATIBLE_FLAGS = [
    "--disable-radix-cache",
    "--chunked-prefill-size=-1",
    "--cuda-graph-backend-decode=disabled",
    "--cuda-graph-backend-prefill=disabled",
    "--disable-overlap-schedule",
    "--attention-backend=torch_native",
]
COMPATIBLE = dict(
    disable_radix_cache=True,
    chunked_prefill_size=-1,
    cuda_graph_backend_decode="disabled",
    cuda_graph_backend_prefill="disabled",
    disable_overlap_schedule=True,
    attention_backend="torch_native",
)
LIGHTKV = KVCompressSettings("lightkv", (2, 4), (4, 2), (0.5, 0.25))
LIGHTKV_FLAGS = [
    "--kv-compress=lightkv",
    "--kv-compress-layers=2,4",
    "--kv-compress-windows=4,2",
    "--kv-compress-ratios=0.5,0.25",
]


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _stock(cls: type) -> type:
    """SGLang's class that ``cls`` subclasses under the same name."""
    (stock,) = [base for base in cls.__mro__[1:] if base.__name__ == cls.__name__]
    assert stock.__module__.startswith("sglang.srt.models.")
    return stock


def _resolved(registry: types.ModuleType, architecture: str) -> str:
    return _class_path(registry.ModelRegistry.resolve_model_cls([architecture])[0])


# --- spawned processes (module-level so that they pickle by reference) -------------------------------------------


def _scheduler_child(payload: bytes) -> dict:
    """A scheduler process with the plugin loaded by SGLang: unpickles its ``ServerArgs``, loads plugins,
    publishes the arguments and imports the model registry (after the plugin registered)."""
    os.environ.pop("SGLANG_PLUGINS", None)
    os.environ.pop(routing.MODELS_PACKAGE_ENV, None)
    from sglang.srt.runtime_context import get_server_args, publish

    server_args = pickle.loads(payload)
    load_plugins()
    registry_imported = routing.REGISTRY_MODULE in sys.modules
    publish(server_args, role="scheduler")
    registry = importlib.import_module(routing.REGISTRY_MODULE)
    return {
        "registry_imported_before": registry_imported,
        "settings": settings_of(get_server_args()),
        "classes": {architecture: _resolved(registry, architecture) for architecture in ARCHITECTURES},
    }


def _fallback_scheduler_child(payload: bytes, models_package: str) -> dict:
    """A scheduler process spawned by the fallback launcher: ``SGLANG_PLUGINS`` leaves the plugin out, and the
    launcher named ``models_package`` in ``SGLANG_EXTERNAL_MODEL_PACKAGE``."""
    os.environ["SGLANG_PLUGINS"] = "another-plugin"
    os.environ[routing.MODELS_PACKAGE_ENV] = models_package
    from sglang.srt.runtime_context import get_server_args, publish

    server_args = pickle.loads(payload)
    load_plugins()
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    _, unknown = parser.parse_known_args(["--model-path", "m", "--kv-compress", "lightkv"])
    publish(server_args, role="scheduler")
    registry = importlib.import_module(routing.REGISTRY_MODULE)
    return {
        "plugin_loaded": not unknown,
        "settings": settings_of(get_server_args()),
        "classes": {architecture: _resolved(registry, architecture) for architecture in ARCHITECTURES},
        "llama": _resolved(registry, "LlamaForCausalLM"),
    }


# --- fixtures ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plugins_loaded() -> None:
    """SGLang's own plugin loading in this process (runs the ``lightkv`` entry point, applies its hooks)."""
    load_plugins()


@pytest.fixture(scope="module")
def model_registry(plugins_loaded) -> types.ModuleType:
    return importlib.import_module(routing.REGISTRY_MODULE)


@pytest.fixture(scope="module")
def resolved_payload(plugins_loaded, tmp_path_factory) -> bytes:
    """A pickled ``ServerArgs`` with LightKV settings, resolved (as the launcher hands it to its subprocesses)
    for a tiny Qwen2 checkpoint."""
    from transformers import Qwen2Config

    model_dir = tmp_path_factory.mktemp("qwen2")
    Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=128,
        architectures=["Qwen2ForCausalLM"],
    ).save_pretrained(model_dir)
    server_args = sglang_server_args.prepare_server_args(
        ["--model-path", str(model_dir), "--device=cpu", *COMPATIBLE_FLAGS, *LIGHTKV_FLAGS]
    )
    server_args.resolve_once()
    assert settings_of(server_args) == LIGHTKV
    return pickle.dumps(server_args)


@pytest.fixture(scope="module")
def fallback_environment(plugins_loaded) -> dict[str, str]:
    """The environment the fallback launcher's setup leaves for the processes it spawns (after SGLang loaded
    the plugins here, so that its ``SGLANG_PLUGINS`` filter applies to the spawned processes only)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SGLANG_PLUGINS", "another-plugin")
        patch.delenv(routing.MODELS_PACKAGE_ENV, raising=False)
        launch_server.setup()
        return {routing.MODELS_PACKAGE_ENV: os.environ[routing.MODELS_PACKAGE_ENV]}


@pytest.fixture(scope="module")
def children(resolved_payload, fallback_environment) -> Iterator[dict[str, Future]]:
    """Both spawned processes, started side by side; the tests that read them come last in this module, so
    that the others run meanwhile."""
    context = multiprocessing.get_context("spawn")
    with (
        ProcessPoolExecutor(1, mp_context=context) as scheduler,
        ProcessPoolExecutor(1, mp_context=context) as fallback,
    ):
        models_package = fallback_environment[routing.MODELS_PACKAGE_ENV]
        yield {
            "scheduler": scheduler.submit(_scheduler_child, resolved_payload),
            "fallback": fallback.submit(_fallback_scheduler_child, resolved_payload, models_package),
        }


def _server_args(**fields) -> ServerArgs:
    return ServerArgs(model_path="m", **{**COMPATIBLE, **fields})


# --- plugin loading and flags ---------------------------------------------------------------------------------------


def test_entry_point_is_installed_and_loaded_by_sglang(plugins_loaded, children):
    # (requests ``children`` only to start the spawned processes while the tests below run)
    (entry_point,) = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == plugin.PLUGIN_NAME]
    assert entry_point.value == "lightkv_adapters.sglang.plugin:register"
    assert entry_point.load() is plugin.register
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    assert {"--kv-compress", "--kv-compress-layers", "--kv-compress-windows", "--kv-compress-ratios"} <= set(
        parser._option_string_actions
    )


def test_help_lists_the_flags(plugins_loaded, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sglang_server_args.prepare_server_args(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "KV cache compression (lightkv)" in help_text
    assert "--kv-compress {none,lightkv,fastv}" in help_text
    for flag in ("--kv-compress-layers", "--kv-compress-windows", "--kv-compress-ratios"):
        assert flag in help_text
    assert "Needs --disable-radix-cache" in help_text


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
        (["--kv-compress", "lightkv", "--kv-compress-layers", "2,4", "--kv-compress-windows", "4"], "one value per"),
    ],
)
def test_inconsistent_flags_are_rejected(plugins_loaded, flags, message):
    with pytest.raises(ValueError, match=message):
        sglang_server_args.prepare_server_args(["--model-path", "m", *COMPATIBLE_FLAGS, *flags])


def test_incompatible_server_arguments_stop_prepare_server_args(plugins_loaded):
    with pytest.raises(ValueError, match="--kv-compress lightkv cannot run") as error:
        sglang_server_args.prepare_server_args(["--model-path", "m", "--kv-compress", "lightkv"])
    for fix in (
        "--disable-radix-cache",
        "--chunked-prefill-size -1",
        "--cuda-graph-backend-decode disabled",
        "--disable-overlap-schedule",
        "--attention-backend triton (GPU) or torch_native (CPU)",
    ):
        assert fix in str(error.value)


# --- model registry -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_registry_resolves_the_plugin_classes(model_registry, architecture):
    model_class, resolved = model_registry.ModelRegistry.resolve_model_cls([architecture])
    assert resolved == architecture
    assert _class_path(model_class) == f"{ARCHITECTURES[architecture]}.{architecture}"
    assert issubclass(model_class, _stock(model_class))


def test_route_models_replaces_stock_classes_in_an_imported_registry(model_registry, monkeypatch):
    stock = {arch: _stock(cls) for arch, cls in model_registry.ModelRegistry.models.items() if arch in ARCHITECTURES}
    monkeypatch.setattr(model_registry.ModelRegistry, "models", {**model_registry.ModelRegistry.models, **stock})
    routing.route_models()
    for architecture, module in ARCHITECTURES.items():
        assert _resolved(model_registry, architecture) == f"{module}.{architecture}"


def test_models_that_fail_to_import_are_logged_or_stop_a_compressing_server(model_registry, monkeypatch, caplog):
    before = dict(model_registry.ModelRegistry.models)
    monkeypatch.setattr(routing, "MODELS_PACKAGE", "lightkv_adapters.sglang.no_such_models")
    routing.route_models()
    assert model_registry.ModelRegistry.models == before
    assert "no_such_models failed to import" in caplog.text
    assert "cannot serve --kv-compress" in caplog.text

    import sglang.srt.runtime_context as runtime_context

    published = types.SimpleNamespace(**{SETTINGS_ATTRIBUTE: KVCompressSettings("lightkv")})
    monkeypatch.setattr(runtime_context, "get_server_args", lambda: published)
    with pytest.raises(RuntimeError, match="no_such_models failed to import"):
        routing.route_models()


# --- validation -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"disable_radix_cache": False}, "pass --disable-radix-cache"),
        ({"chunked_prefill_size": None}, "chunked prefill is on by default"),
        ({"chunked_prefill_size": 8192}, "--chunked-prefill-size 8192 can split a prompt (without --context-length)"),
        ({"chunked_prefill_size": 4096, "context_length": 8192}, "(below --context-length 8192)"),
        ({"chunked_prefill_size": 8192, "context_length": 8192, "enable_mixed_chunk": True}, "--enable-mixed-chunk"),
        ({"cuda_graph_backend_decode": None}, "CUDA graphs are on (decode: full); pass --cuda-graph-backend-decode"),
        ({"cuda_graph_backend_prefill": "breakable"}, "(prefill: breakable); pass --cuda-graph-backend-prefill"),
        (
            {
                "cuda_graph_backend_decode": None,
                "disable_cuda_graph": True,
                "cuda_graph_config": {"decode": {"backend": "full"}},
            },
            "(decode: full); pass --cuda-graph-backend-decode disabled and no other backend in --cuda-graph-config",
        ),
        ({"disable_overlap_schedule": False}, "pass --disable-overlap-schedule"),
        ({"attention_backend": None}, "the prefill and decode attention backend is left to SGLang's automatic choice"),
        ({"attention_backend": "flashinfer"}, "--attention-backend flashinfer is not supported"),
        ({"prefill_attention_backend": "fa3"}, "--prefill-attention-backend fa3 is not supported"),
        ({"decode_attention_backend": "flashinfer"}, "--decode-attention-backend flashinfer is not supported"),
        ({"attention_backend": None, "decode_attention_backend": "triton"}, "the prefill attention backend is left"),
        ({"tp_size": 2}, "--tp-size 2: only one GPU"),
        ({"pp_size": 2}, "--pp-size 2: only one GPU"),
        ({"attn_dp_size": 2}, "data-parallel attention"),
        ({"enable_dp_attention": True}, "data-parallel attention"),
        ({"speculative_algorithm": "EAGLE"}, "speculative decoding"),
        ({"decoupled_spec_role": "verifier"}, "speculative decoding"),
        ({"disaggregation_mode": "prefill"}, "--disaggregation-mode prefill: prefill-decode disaggregation"),
    ],
)
def test_each_incompatibility_names_its_fix(fields, message):
    with pytest.raises(ValueError) as error:
        validate(_server_args(**fields), KVCompressSettings("fastv"))
    text = str(error.value)
    assert text.startswith("--kv-compress fastv cannot run with these server arguments:\n  - ")
    assert message in text
    assert text.count("\n  - ") == 1


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"chunked_prefill_size": 8192, "context_length": 8192},
        {"chunked_prefill_size": 0},
        {"cuda_graph_backend_decode": None, "cuda_graph_backend_prefill": None, "disable_cuda_graph": True},
        {"cuda_graph_backend_decode": None, "disable_decode_cuda_graph": True, "disable_prefill_cuda_graph": True},
        {
            "cuda_graph_backend_decode": None,
            "cuda_graph_backend_prefill": None,
            "cuda_graph_config": {"decode": {"backend": "disabled"}, "prefill": {"backend": "disabled"}},
        },
        {"attention_backend": "triton"},
        {"attention_backend": None, "prefill_attention_backend": "torch_native", "decode_attention_backend": "triton"},
        {"dp_size": 2},
    ],
)
def test_compatible_arguments_pass(fields):
    validate(_server_args(**fields), LIGHTKV)


def test_the_default_prefill_graph_of_cuda_counts(monkeypatch):
    import sglang.srt.model_executor.cuda_graph_config as cuda_graph_config

    monkeypatch.setattr(cuda_graph_config, "default_prefill_backend", lambda: "breakable")
    server_args = _server_args(cuda_graph_backend_decode=None, cuda_graph_backend_prefill=None)
    with pytest.raises(ValueError, match=r"\(decode: full, prefill: breakable\); pass --cuda-graph-backend-decode "):
        validate(server_args, LIGHTKV)


def test_nothing_is_checked_without_compression():
    validate(ServerArgs(model_path="m", tp_size=4, attention_backend="flashinfer"), KVCompressSettings())


def test_an_untested_sglang_is_refused_only_when_compression_is_on(monkeypatch):
    import sglang

    monkeypatch.setattr(sglang, "__version__", "0.5.24")
    with pytest.raises(ValueError, match=r"SGLang 0\.5\.24 is not a release this plugin is tested with \(0\.5\.23\)"):
        validate(_server_args(attention_backend="triton"), LIGHTKV)
    validate(_server_args(attention_backend="triton"), KVCompressSettings())


def test_every_problem_is_listed_at_once():
    with pytest.raises(ValueError) as error:
        validate(ServerArgs(model_path="m", tp_size=2, speculative_algorithm="EAGLE"), LIGHTKV)
    assert str(error.value).count("\n  - ") == 7


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

    Engine(server_args=_server_args(), kv_compress="fastv", kv_compress_layers=3, kv_compress_ratios=0.25)
    assert settings_of(engine_calls[-1]["server_args"]) == KVCompressSettings("fastv", (3,), None, (0.25,))
    ready = build_server_args(model_path="m", kv_compress="fastv", **COMPATIBLE)
    Engine(server_args=ready)
    assert settings_of(engine_calls[-1]["server_args"]) == KVCompressSettings("fastv")
    with pytest.raises(TypeError, match=r"takes no other server arguments, got \['tp_size'\]"):
        Engine(server_args=ready, tp_size=2)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"kv_compress": "lightkv"}, ValueError, "pass --disable-radix-cache"),
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


# --- fallback launcher ----------------------------------------------------------------------------------------------


def test_install_leaves_the_environment_alone_when_sglang_loads_the_plugin(monkeypatch):
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    monkeypatch.delenv(routing.MODELS_PACKAGE_ENV, raising=False)
    plugin.install()
    assert routing.MODELS_PACKAGE_ENV not in os.environ
    monkeypatch.setenv("SGLANG_PLUGINS", f"another-plugin,{plugin.PLUGIN_NAME}")
    plugin.install()
    assert routing.MODELS_PACKAGE_ENV not in os.environ


def test_install_refuses_another_external_model_package(monkeypatch):
    monkeypatch.setenv("SGLANG_PLUGINS", "another-plugin")
    monkeypatch.setenv(routing.MODELS_PACKAGE_ENV, "someone.models")
    with pytest.raises(RuntimeError, match="add lightkv to SGLANG_PLUGINS"):
        plugin.install()


def test_launcher_main_runs_sglang_with_the_settings(plugins_loaded, monkeypatch):
    runs, kills = [], []
    monkeypatch.setattr(launch_server, "run_server", runs.append)
    monkeypatch.setattr(launch_server, "kill_process_tree", lambda pid, include_parent: kills.append(include_parent))
    launch_server.main(["--model-path", "m", *COMPATIBLE_FLAGS, *LIGHTKV_FLAGS])
    (server_args,) = runs
    assert settings_of(server_args) == LIGHTKV
    assert kills == [False]


# --- subprocesses ---------------------------------------------------------------------------------------------------


def test_settings_survive_pickling_into_a_scheduler(children):
    result = children["scheduler"].result(timeout=300)
    assert result["settings"] == LIGHTKV
    assert not result["registry_imported_before"]  # routed when the registry was first imported
    assert result["classes"] == {arch: f"{module}.{arch}" for arch, module in ARCHITECTURES.items()}


def test_fallback_launcher_routes_its_scheduler_without_the_plugin(children, fallback_environment):
    assert fallback_environment == {routing.MODELS_PACKAGE_ENV: routing.MODELS_PACKAGE}
    result = children["fallback"].result(timeout=300)
    assert not result["plugin_loaded"]
    assert result["settings"] == LIGHTKV
    assert result["classes"] == {arch: f"{module}.{arch}" for arch, module in ARCHITECTURES.items()}
    assert result["llama"] == "sglang.srt.models.llama.LlamaForCausalLM"
