"""Attention functions registered in transformers' ``AttentionInterface`` that hand the post-RoPE ``q``/``k``
of a layer to LightKV, then run the stock kernel unchanged.

``lightkv_sdpa`` wraps ``sdpa`` and ``lightkv_eager`` wraps the model's own ``eager_attention_forward``. The
text model's attention modules reach them through a :class:`WrappedAttentionConfig` in place of their ``config``;
no config is written. Each name is also registered in ``AttentionMaskInterface`` with the stock mask builder of the
kernel it wraps (transformers returns no causal mask at all for an implementation it does not know), so a mask
built from an attention module's config keeps its padding.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

#: Stock implementation -> the name of its wrapper.
WRAPPED = {"sdpa": "lightkv_sdpa", "eager": "lightkv_eager"}

#: Attention module -> callback receiving ``(query, key, scaling)`` while a prefill captures that layer.
_CAPTURES: weakref.WeakKeyDictionary[nn.Module, Callable[[torch.Tensor, torch.Tensor, float], None]] = (
    weakref.WeakKeyDictionary()
)


def capture_from(module: nn.Module, callback: Callable[[torch.Tensor, torch.Tensor, float], None]) -> None:
    """Call ``callback(query, key, scaling)`` each time ``module`` attends through a wrapper below."""
    _CAPTURES[module] = callback


def stop_capture(module: nn.Module) -> None:
    _CAPTURES.pop(module, None)


def _capture(module: nn.Module, query: torch.Tensor, key: torch.Tensor, scaling: float | None) -> None:
    callback = _CAPTURES.get(module)
    if callback is not None:
        callback(query, key, query.shape[-1] ** -0.5 if scaling is None else scaling)


def lightkv_sdpa(module, query, key, value, attention_mask, scaling=None, **kwargs):
    _capture(module, query, key, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def lightkv_eager(module, query, key, value, attention_mask, scaling=None, **kwargs):
    _capture(module, query, key, scaling)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"{type(module).__name__} has no eager_attention_forward for lightkv to wrap")
    return eager(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def register() -> None:
    """Register both wrappers and their mask builders (idempotent)."""
    AttentionInterface.register("lightkv_sdpa", lightkv_sdpa)
    AttentionInterface.register("lightkv_eager", lightkv_eager)
    AttentionMaskInterface.register("lightkv_sdpa", sdpa_mask)
    AttentionMaskInterface.register("lightkv_eager", eager_mask)


class WrappedAttentionConfig:
    """What an attention module of a hooked model reads as its ``config``: the model's own config, except that
    ``_attn_implementation`` names the capturing wrapper of the implementation the config holds *now*.

    The caller's config is never written, so a second model built from it, ``set_attn_implementation`` and
    ``output_attentions`` behave as stock; every other attribute, read or written, is the config's own.
    """

    def __init__(self, config: object) -> None:
        object.__setattr__(self, "config", config)

    @property
    def _attn_implementation(self) -> str:
        implementation = self.config._attn_implementation
        return WRAPPED.get(implementation, implementation)

    def __getattr__(self, name: str) -> object:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.config, name)

    def __setattr__(self, name: str, value: object) -> None:
        setattr(self.config, name, value)

    def __reduce__(self) -> tuple:
        # a copied or pickled module gets the plain config: the copy is not hooked
        return _plain, (self.config,)


def _plain(config: object) -> object:
    return config


def check_implementations(modules: list[nn.Module]) -> None:
    """Raise ``NotImplementedError`` unless every module's config uses an implementation lightkv wraps."""
    for module in modules:
        implementation = module.config._attn_implementation
        if implementation not in WRAPPED:
            raise NotImplementedError(
                f"lightkv wraps the {sorted(WRAPPED)} attention implementations, not {implementation!r}: load the "
                "model with attn_implementation='sdpa' or 'eager'"
            )


def use_wrappers(modules: list[nn.Module]) -> None:
    """Point every attention module of ``modules`` at the capturing wrappers through a
    :class:`WrappedAttentionConfig` of its config (checked with :func:`check_implementations` first)."""
    check_implementations(modules)
    register()
    for module in modules:
        module.config = WrappedAttentionConfig(module.config)


def restore(modules: list[nn.Module]) -> None:
    """Give every module its own config back (undoes :func:`use_wrappers`)."""
    for module in modules:
        if isinstance(module.config, WrappedAttentionConfig):
            module.config = module.config.config


def implementation_of(module: nn.Module) -> str:
    """The stock attention implementation ``module`` runs now (its config's, wrapped or not)."""
    config = module.config
    return (config.config if isinstance(config, WrappedAttentionConfig) else config)._attn_implementation
