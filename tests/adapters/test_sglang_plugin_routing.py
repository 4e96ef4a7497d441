"""The SGLang plugin's loading and model routing on SGLang's real classes (CPU): the entry point run by SGLang's
``load_plugins``, the model registry resolving the plugin's classes, the fallback launcher's setup, and the
settings riding a pickled ``ServerArgs`` into spawned processes.

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

from helpers.sglang_plugin import COMPATIBLE_FLAGS, LIGHTKV, LIGHTKV_FLAGS  # noqa: E402
from sglang.srt import server_args as sglang_server_args  # noqa: E402
from sglang.srt.plugins import load_plugins  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402

from lightkv_adapters.sglang import launch_server, plugin, routing  # noqa: E402
from lightkv_adapters.sglang.settings import SETTINGS_ATTRIBUTE, KVCompressSettings, settings_of  # noqa: E402

#: The plugin's architectures and the module of its class for each.
ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": "lightkv_adapters.sglang.models.qwen_vl",
    "Qwen2_5_VLForConditionalGeneration": "lightkv_adapters.sglang.models.qwen_vl",
    "LlavaLlamaForCausalLM": "lightkv_adapters.sglang.models.llava",
    "LlavaQwenForCausalLM": "lightkv_adapters.sglang.models.llava",
}


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


# --- plugin loading ------------------------------------------------------------------------------------------------


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
