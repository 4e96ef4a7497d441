"""SGLang 0.5.23 importable and runnable without a GPU: :func:`install` before importing ``sglang``.

Stubs the CUDA-only modules SGLang imports but never runs on its CPU path (``sgl_kernel``, ``torchvision``),
where they are not installed, and selects SGLang's CPU engine. Used by the adapter's CPU tests and by
``lightkv_perf.capacity``; see the README (SGLang, tests) for why each module is stubbed.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import types

#: Modules replaced by stubs, with why each cannot be the real one here.
STUBBED_MODULES = {
    "sgl_kernel": "SGLang's CUDA kernel wheel",
    "torchvision": "no CPU-only wheel on the project's registries (pulls a CUDA torch)",
}


class SGLangStubCalled(RuntimeError):
    """A stubbed CUDA-only module was called: the caller reached code that needs a GPU build."""


class _StubModule(types.ModuleType):
    """A module whose every attribute is another stub; calling one raises :class:`SGLangStubCalled`."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__path__ = []
        self.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        self.__file__ = None

    def __getattr__(self, name: str) -> _StubModule:
        if name.startswith("__"):
            raise AttributeError(name)
        child = _StubModule(f"{self.__name__}.{name}")
        setattr(self, name, child)
        return child

    def __call__(self, *args, **kwargs):
        raise SGLangStubCalled(f"{self.__name__} is a stub of a CUDA-only module and cannot run on the CPU")

    def __mro_entries__(self, bases: tuple) -> tuple:
        return (object,)


class _StubFinder:
    """Serves a stub for every submodule of a stubbed package (``torchvision.transforms.v2`` ...)."""

    def __init__(self, packages: set[str]) -> None:
        self.packages = packages

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname.split(".")[0] in self.packages:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> _StubModule:
        return _StubModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def install() -> None:
    """Stub whichever of :data:`STUBBED_MODULES` is not installed and select SGLang's CPU engine
    (``SGLANG_USE_CPU_ENGINE=1``). Idempotent; call before importing ``sglang``.

    ``transformers`` is imported first so that its own availability check records that torchvision is
    absent (it then never routes image processing through the stub).
    """
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    if any(isinstance(finder, _StubFinder) for finder in sys.meta_path):
        return
    import transformers.utils.import_utils as transformers_imports

    transformers_imports.is_torchvision_available()
    missing = {name for name in STUBBED_MODULES if importlib.util.find_spec(name) is None}
    if missing:
        sys.meta_path.insert(0, _StubFinder(missing))
