"""Attention functions registered in transformers' ``AttentionInterface`` that hand the post-RoPE ``q``/``k``
of a layer to LightKV, then run the stock kernel unchanged.

``lightkv_sdpa`` wraps ``sdpa`` and ``lightkv_eager`` wraps the model's own ``eager_attention_forward``. Each
name is also registered in ``AttentionMaskInterface`` with the stock mask builder of the kernel it wraps:
transformers returns no causal mask at all for an implementation it does not know, which would silently
drop the padding mask.
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


def use_wrappers(configs: list[object]) -> list[tuple[object, str]]:
    """Point every distinct config among ``configs`` (a text model's and its layers') at the capturing wrapper of
    its attention implementation; returns ``(config, stock implementation)`` pairs for :func:`restore`.

    Raises:
        NotImplementedError for an implementation lightkv does not wrap (before changing any config).
    """
    register()
    distinct = list({id(config): config for config in configs}.values())
    swapped = []
    for config in distinct:
        implementation = config._attn_implementation
        if implementation not in WRAPPED:
            raise NotImplementedError(
                f"lightkv wraps the {sorted(WRAPPED)} attention implementations, not {implementation!r}: load the "
                "model with attn_implementation='sdpa' or 'eager'"
            )
        swapped.append((config, implementation))
    for config, implementation in swapped:
        config._attn_implementation = WRAPPED[implementation]
    return swapped


def restore(swapped: list[tuple[object, str]]) -> None:
    """Give every config its stock attention implementation back (what :func:`use_wrappers` returned)."""
    for config, implementation in swapped:
        config._attn_implementation = implementation
