"""The ``lightkv`` SGLang plugin: :func:`register` (entry point ``lightkv`` of ``sglang.srt.plugins``) wires the
flags (:mod:`~lightkv_adapters.sglang.settings`), the pools' scheduler hooks (:mod:`~lightkv_adapters.sglang.admission`)
and the model routing (:mod:`~lightkv_adapters.sglang.routing`) into SGLang; :func:`install` does it in the calling
process where ``SGLANG_PLUGINS`` keeps SGLang from loading the plugin. See the README (SGLang).
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from lightkv_adapters.sglang.admission import POOL_HOOKS
from lightkv_adapters.sglang.decode_graph import GRAPH_HOOKS
from lightkv_adapters.sglang.routing import MODELS_PACKAGE, MODELS_PACKAGE_ENV, route_models
from lightkv_adapters.sglang.settings import add_cli_args_hook, from_cli_args_hook

#: Name of the entry point (what ``SGLANG_PLUGINS`` lists to allow it).
PLUGIN_NAME = "lightkv"
#: ``(target, hook, kind)`` of every hook :func:`register` hands to SGLang's ``HookRegistry``.
HOOKS = (
    ("sglang.srt.server_args.ServerArgs.add_cli_args", add_cli_args_hook, HookType.AFTER),
    ("sglang.srt.server_args.ServerArgs.from_cli_args", from_cli_args_hook, HookType.AFTER),
    *POOL_HOOKS,
    *GRAPH_HOOKS,
)

_registered = False


def register() -> None:
    """Entry point: registers this plugin's hooks (:data:`HOOKS`) with SGLang's ``HookRegistry`` (SGLang applies
    them) and routes the model architectures to this package's classes. Idempotent."""
    global _registered
    if _registered:
        return
    _registered = True
    for target, hook, kind in HOOKS:
        HookRegistry.register(target, hook, kind)
    route_models()


def install() -> None:
    """Registers and applies this plugin in the calling process, for launchers that cannot rely on SGLang's
    plugin loading. If SGLang will not load the plugin in the processes spawned from here (``SGLANG_PLUGINS``
    leaves it out, or the entry point is not installed), names the model package in
    ``SGLANG_EXTERNAL_MODEL_PACKAGE`` so their model registry resolves this package's classes (SGLang's other
    architectures still resolve: the registry then imports its own models on first use of one).

    Raises:
        RuntimeError if ``SGLANG_EXTERNAL_MODEL_PACKAGE`` already names another package in that case.
    """
    register()
    HookRegistry.apply_hooks()
    if _loaded_by_sglang():
        return
    current = os.environ.get(MODELS_PACKAGE_ENV, "")
    if current not in ("", MODELS_PACKAGE):
        raise RuntimeError(
            f"SGLANG_PLUGINS={os.environ.get('SGLANG_PLUGINS', '')!r} keeps SGLang's processes from loading the "
            f"{PLUGIN_NAME!r} plugin, and {MODELS_PACKAGE_ENV}={current!r} leaves no room for its model package "
            f"{MODELS_PACKAGE!r}: add {PLUGIN_NAME} to SGLANG_PLUGINS"
        )
    os.environ[MODELS_PACKAGE_ENV] = MODELS_PACKAGE


def _loaded_by_sglang() -> bool:
    """Whether SGLang's ``load_plugins`` runs this plugin (entry point installed and allowed by ``SGLANG_PLUGINS``)."""
    if not entry_points(group="sglang.srt.plugins", name=PLUGIN_NAME):
        return False
    from sglang.srt.environ import envs

    allowed = {name.strip() for name in envs.SGLANG_PLUGINS.get().split(",") if name.strip()}
    return not allowed or PLUGIN_NAME in allowed
