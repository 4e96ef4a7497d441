"""``apply_lightkv`` / ``remove_lightkv`` / ``with lightkv(model)``: put a compression method's hooks
(:class:`~lightkv_adapters.hf.hooks.ModelHooks`) into a stock transformers model, atomically, and take them out."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lightkv_adapters.hf.families import family_of
from lightkv_adapters.hf.hooks import ModelHooks
from lightkv_adapters.hf.methods import method_for
from lightkv_adapters.hf.versions import warn_if_untested
from lightkv_core.config import LightKVConfig
from lightkv_core.methods import CompressionMethod

_ADAPTERS: weakref.WeakKeyDictionary[nn.Module, ModelHooks] = weakref.WeakKeyDictionary()


def apply_lightkv(
    model: nn.Module, config: LightKVConfig | CompressionMethod | str | None = None, *, backend: str = "auto"
) -> nn.Module:
    """Hook a compression method into ``model`` in place; ``generate()`` and ``forward()`` keep their API.

    Args:
        model: a ``LlavaForConditionalGeneration`` (Llama or Qwen2 text model),
            ``LlavaNextForConditionalGeneration``, ``Qwen2VLForConditionalGeneration`` or
            ``Qwen2_5_VLForConditionalGeneration`` loaded with ``attn_implementation="sdpa"`` or ``"eager"``.
        config: a :class:`LightKVConfig` (used as given), the name of a released preset (scaled to the
            model's depth), the name of a method in ``lightkv_core.METHODS`` (``"fastv"``, ``"prefixkv"``,
            ... with its defaults, see :func:`~lightkv_core.methods.method_by_name`), any method instance
            (:class:`PrefillReduction` such as ``FastV(2, 0.5)``, or :class:`KVEviction` such as
            ``PrefixKV(retention=0.3)``), or ``None``: the released schedule of the model's family scaled to
            its depth.
        backend: kernels of a method given by name or as a schedule, ``"auto"``, ``"triton"`` or ``"torch"``.

    After each prefill ``model.lightkv_stats`` holds a :class:`~lightkv_core.stats.PrefillStats`. A transformers
    release outside the tested range (:data:`~lightkv_adapters.hf.versions.TESTED_TRANSFORMERS`) gets a warning.

    ``model.lightkv_method`` is the method in force (a preset or ``None`` shows the schedule scaled to the model).
    ``copy.deepcopy(model)`` gives a copy with lightkv applied the same way; pickling a hooked model is refused.

    Applying is atomic: every argument is checked first, and a refusal leaves the model exactly as it was.

    Raises:
        NotImplementedError for an unsupported model class, text backbone or attention implementation;
        ValueError for a schedule that does not fit the model, a method that renumbers positions or an unknown
        backend; RuntimeError if lightkv is already applied.
    """
    if model in _ADAPTERS:
        raise RuntimeError("lightkv is already applied to this model; call remove_lightkv(model) first")
    warn_if_untested()
    family = family_of(model)
    text_model = model.model.language_model
    method = method_for(family, text_model.config.num_hidden_layers, config, backend)
    adapter = ModelHooks(model, family, text_model, method)
    adapter.check()
    try:
        adapter.attach()
        _hook_copies(model)
    except BaseException:
        adapter.detach()
        _unhook_copies(model)
        raise
    _ADAPTERS[model] = adapter
    return model


def remove_lightkv(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_lightkv`: hooks removed, attention implementation restored, ``lightkv_stats`` gone.

    Raises:
        ValueError if lightkv is not applied to ``model``.
    """
    adapter = _ADAPTERS.pop(model, None)
    if adapter is None:
        raise ValueError("lightkv is not applied to this model")
    adapter.detach()
    _unhook_copies(model)
    return model


def _hook_copies(model: nn.Module) -> None:
    """Make ``copy.deepcopy(model)`` copy the plain model and apply the same method to the copy, and pickling
    refuse with a message (hooks and their closures cannot be pickled)."""

    def deepcopy_hooked(memo: dict) -> nn.Module:
        # the original keeps its adapter (its stats and the layouts of its compressed caches)
        adapter, stats = _ADAPTERS[model], model.lightkv_stats
        adapter.detach()
        _unhook_copies(model)
        try:
            duplicate = copy.deepcopy(model, memo)
        finally:
            adapter.attach()
            model.lightkv_stats = stats
            _hook_copies(model)
        return apply_lightkv(duplicate, adapter.method)

    def refuse_pickle(protocol: int) -> object:
        raise TypeError(
            "a model with lightkv applied cannot be pickled: remove_lightkv(model) first (or save its state_dict / "
            "save_pretrained), and apply lightkv again after loading"
        )

    vars(model)["__deepcopy__"] = deepcopy_hooked
    vars(model)["__reduce_ex__"] = refuse_pickle


def _unhook_copies(model: nn.Module) -> None:
    for name in ("__deepcopy__", "__reduce_ex__"):
        vars(model).pop(name, None)


@contextmanager
def lightkv(
    model: nn.Module, config: LightKVConfig | CompressionMethod | str | None = None, *, backend: str = "auto"
) -> Iterator[nn.Module]:
    """``with lightkv(model, config): model.generate(...)``: :func:`apply_lightkv` for the block only."""
    apply_lightkv(model, config, backend=backend)
    try:
        yield model
    finally:
        remove_lightkv(model)
