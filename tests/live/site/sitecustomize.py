"""Shims that let a real SGLang 0.5.23 HTTP server run on a CPU-only machine: test set-up of tests/live/ only.

This folder is put on ``PYTHONPATH`` of the live servers the suite starts (``helpers.live_server``), so Python
runs this file at start-up in every process SGLang spawns. It does nothing unless ``LIGHTKV_LIVE_SHIMS=1``.

1. torchvision (installed ``--no-deps`` into ``.venv/sglang-live`` by scripts/setup.sh): its compiled ops link a
   CUDA torch and do not load, which torchvision tolerates, except that its fake-kernel registrations need the
   schemas ``torchvision::nms`` and ``torchvision::qnms`` to exist. They are defined here (no kernels), so its
   pure-Python transforms, which Transformers' Qwen2-VL image processor uses, import and run.
2. ``torch.ops.sgl_kernel.*_cpu``: SGLang's CPU engine looks four ops of sgl-kernel's CPU build up when its
   multimodal processor registry imports ``models/qwen3_5.py``; without them SGLang drops Qwen2.5-VL's
   processor. Only those exact schemas are defined (no kernels: calling one raises), so SGLang's ``hasattr``
   probes of any other op still answer False.
3. ``lightkv_adapters.sglang.cpu_env.install()``: the stub of the CUDA kernel wheel ``sgl_kernel`` and SGLang's
   CPU engine, as in the in-process SGLang tests.
4. SGLang 0.5.23's LLaVA-1.5 (``LlavaBaseForCausalLM``) loads its CLIP tower in float16 whatever ``--dtype``
   says and feeds it the processor's float16 pixels, so at ``--dtype float32`` (every live server: the CPU has no
   float16 path worth testing) its float16 features meet the float32 projector and the first image request fails in
   stock SGLang. Once SGLang's module is imported, the tower is loaded at float32 and its input cast to the tower's
   dtype (the pixels keep their float16 rounding, as the reference in tests/live/hf_reference.py does). The model
   code runs as released; tests/helpers/sglang_runner.py does the same for the in-process tests.
5. A fault for the suite to inject, only with ``LIGHTKV_LIVE_FAULT_GRID=ROWSxCOLS``: LightKV's and FastV's
   ``reduce`` raise ``RuntimeError`` inside the model's prefill whenever the batch holds an image of exactly that
   token grid (a shape no other test sends), standing for any failure in lightkv's part of a prefill.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

#: sgl-kernel CPU ops SGLang looks up at import time on its CPU engine.
SGL_KERNEL_CPU_OPS = (
    "fused_sigmoid_mul_cpu",
    "fused_qk_gemma_rmsnorm_cpu",
    "fused_qk_gemma_rmsnorm_with_gate_cpu",
    "fused_qkvzba_split_reshape_cat_contiguous_cpu",
)
#: torchvision op schemas its import registers fake kernels for.
TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

_fragments: list = []  # the torch.library fragments must stay alive for their definitions to stay


def _define(namespace: str, schemas: tuple[str, ...]) -> None:
    import torch

    fragment = torch.library.Library(namespace, "FRAGMENT")
    for schema in schemas:
        with contextlib.suppress(RuntimeError):  # already defined (a working build of the real library)
            fragment.define(schema)
    _fragments.append(fragment)


def _install() -> None:
    if importlib.util.find_spec("torchvision") is not None:
        _define("torchvision", TORCHVISION_SCHEMAS)
    _define("sgl_kernel", tuple(f"{name}(Tensor[] placeholder_args) -> ()" for name in SGL_KERNEL_CPU_OPS))
    from lightkv_adapters.sglang import cpu_env

    cpu_env.install()
    sys.meta_path.insert(0, _AfterImport("sglang.srt.models.llava", _llava_tower_at_float32))
    fault = os.environ.get("LIGHTKV_LIVE_FAULT_GRID")
    if fault:
        _inject_fault(tuple(int(side) for side in fault.split("x")))


class _AfterImport:
    """Import-system finder that runs ``patch(module)`` right after the module ``name`` is first imported."""

    def __init__(self, name: str, patch) -> None:
        self.name = name
        self.patch = patch

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        run = spec.loader.exec_module

        def exec_module(module) -> None:
            run(module)
            self.patch(module)

        spec.loader.exec_module = exec_module
        return spec


def _llava_tower_at_float32(module) -> None:
    import torch

    vision_model = module.CLIPVisionModel

    class TowerAtFloat32:
        @staticmethod
        def from_pretrained(path, *args, torch_dtype=None, **kwargs):
            return vision_model.from_pretrained(path, *args, dtype=torch.float32, **kwargs)

    module.CLIPVisionModel = TowerAtFloat32
    encode = module.LlavaBaseForCausalLM.encode_images

    def encode_images(self, pixel_values):
        return encode(self, pixel_values.to(self.vision_tower.dtype))

    module.LlavaBaseForCausalLM.encode_images = encode_images


class InjectedFault(RuntimeError):
    """The failure the live suite forces inside a prefill."""


def _inject_fault(grid: tuple[int, int]) -> None:
    from lightkv_core.methods import FastV, LightKV

    for method in (LightKV, FastV):
        method.reduce = _failing(method.reduce, grid)


def _failing(reduce, grid: tuple[int, int]):
    def wrapped(self, layer, hidden, q, k, spans, *args, **kwargs):
        if any((span.rows, span.cols) == grid for request in spans for span in request):
            raise InjectedFault(f"fault injected by the live-server suite (an image of {grid[0]}x{grid[1]} tokens)")
        return reduce(self, layer, hidden, q, k, spans, *args, **kwargs)

    return wrapped


if os.environ.get("LIGHTKV_LIVE_SHIMS") == "1":
    _install()
