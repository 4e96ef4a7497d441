"""Makes SGLang 0.5.23 importable and runnable on a machine without a GPU, for the SGLang adapter's tests.

SGLang is installed with ``--no-deps`` (``scripts/sglang-cpu.txt``). Two of the modules its import tree
pulls in cannot be installed here and are never run on the CPU path these tests take:

* ``sgl_kernel``: SGLang's compiled kernel wheel (CUDA builds only; the CPU engine's AMX kernels are
  used only on Intel AMX / arm64 hosts, which SGLang checks before calling them);
* ``torchvision``: imported at module level by the InternVL/Nemotron image preprocessing that SGLang's
  config package loads; its only wheels on the project's registries pull a CUDA build of torch.

Each is replaced by a *stub module*: importing it and reading attributes works, and calling anything in
it raises :class:`SGLangStubCalled` naming the attribute, so a test that reached CUDA-only code fails
loudly instead of computing something else. ``SGLANG_USE_CPU_ENGINE=1`` selects SGLang's CPU device.
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
    """A stubbed CUDA-only module was called: the test reached code that needs a GPU build."""


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
        raise SGLangStubCalled(f"{self.__name__} is a test stub of a CUDA-only module and cannot run on the CPU")

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
    """Stub whichever of :data:`STUBBED_MODULES` is not installed and select SGLang's CPU engine.
    Idempotent; call before importing ``sglang``.

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
