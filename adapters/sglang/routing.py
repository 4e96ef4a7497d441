"""Routes SGLang's model registry to this adapter's model classes (:data:`MODELS_PACKAGE`): :func:`route_models`.

The classes go in as soon as SGLang's registry module is imported, so the processes that never import it (the
launcher, the detokenizer) do not pay for the model modules. See the README (SGLang) for what the classes do.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from typing import TYPE_CHECKING

from lightkv_adapters.sglang.settings import settings_of

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec
    from types import ModuleType

logger = logging.getLogger(__name__)

#: Package holding the model classes, each module with SGLang's ``EntryClass`` list.
MODELS_PACKAGE = "lightkv_adapters.sglang.models"
#: SGLang's environment variable naming one extra model package, imported before its own models.
MODELS_PACKAGE_ENV = "SGLANG_EXTERNAL_MODEL_PACKAGE"
#: The module defining SGLang's ``ModelRegistry``.
REGISTRY_MODULE = "sglang.srt.models.registry"


def route_models() -> None:
    """Resolves this package's architectures to its classes in SGLang's ``ModelRegistry``: now if the registry
    is imported, otherwise right after its module is first imported (:class:`_RouteOnImport`)."""
    registry = sys.modules.get(REGISTRY_MODULE)
    if registry is not None:
        _route_architectures(registry)
    elif not any(isinstance(finder, _RouteOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RouteOnImport())


class _RouteOnImport:
    """Import-system finder that lets the other finders find :data:`REGISTRY_MODULE` and routes the
    architectures once the module has run; it leaves ``sys.meta_path`` on first use."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        if fullname != REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        loader = spec.loader if spec is not None else None
        if loader is None:
            return spec

        def exec_module(module: ModuleType) -> None:
            del loader.exec_module  # the loader's own method again
            loader.exec_module(module)
            _route_architectures(module)

        loader.exec_module = exec_module
        return spec


def _route_architectures(registry: ModuleType) -> None:
    """Puts the classes of :data:`MODELS_PACKAGE` into ``registry.ModelRegistry``. If they fail to import, SGLang keeps
    its own classes and the failure is logged, unless this process serves ``--kv-compress``, which it stops.

    Raises:
        RuntimeError if the classes fail to import and the published server arguments enable compression.
    """
    try:
        classes = registry.import_model_classes(MODELS_PACKAGE, strict=True)
    except Exception as error:
        message = (
            f"lightkv: the model classes of {MODELS_PACKAGE} failed to import ({type(error).__name__}: {error}); "
            "SGLang keeps its own classes, which cannot serve --kv-compress"
        )
        if _compression_requested():
            raise RuntimeError(message) from error
        logger.exception(message)
        return
    registry.ModelRegistry.models.update(classes)


def _compression_requested() -> bool:
    """Whether this process's published ``ServerArgs`` enable ``--kv-compress`` (False before publication)."""
    from sglang.srt.runtime_context import get_server_args

    try:
        return settings_of(get_server_args()).enabled
    except ValueError:
        return False
