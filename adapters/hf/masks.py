"""Masks, rotary tables and position ids of the HF adapter's shortened layers, and the layout of a compressed
``DynamicCache`` (which prompt tokens each layer holds)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache


@dataclass
class CacheLayout:
    """Which prefill tokens each shortened layer of a compressed cache holds.

    Attributes:
        prefill_length: tokens of the prefill.
        columns: per layer, ``None`` (the layer holds the full prefill) or ``(B, L)`` int64, the prefill
            index of every slot, ``-1`` for a dead slot (after an eviction: the token head 0 holds; the
            other heads may hold other tokens, in the same slots).
        decoded: tokens decoded into the cache since the prefill.
    """

    prefill_length: int
    columns: list[torch.Tensor | None]
    decoded: int = 0


def allowed_and_masked(mask: torch.Tensor) -> tuple[object, object]:
    """The values that let a query see a key, and that hide it, in a bool or additive float mask."""
    if mask.dtype == torch.bool:
        return True, False
    return 0.0, torch.finfo(mask.dtype).min


def gather_prefill_inputs(originals: dict, columns: torch.Tensor) -> dict:
    """Layer 0's mask, rotary tables and position ids at the surviving prefill indices ``columns``
    ``(B, S')`` (``-1``: a dead slot)."""
    batch, length = columns.shape
    alive = columns >= 0
    index = columns.clamp(min=0)
    cos, sin = originals["position_embeddings"]
    # (B or 1, S, d), or (3, B, S, d) where Qwen2-VL applies its M-RoPE sections inside attention (transformers < 5.17)
    swapped = {
        "position_embeddings": tuple(
            table.expand(*table.shape[:-3], batch, -1, -1).gather(
                -2, index[..., None].expand(*table.shape[:-3], batch, length, table.shape[-1])
            )
            for table in (cos, sin)
        )
    }
    position_ids = originals["position_ids"]
    if position_ids is not None:
        swapped["position_ids"] = position_ids.expand(*position_ids.shape[:-2], batch, -1).gather(
            -1, index.expand(*position_ids.shape[:-2], batch, length)
        )
    mask = originals["attention_mask"]
    dead_rows = ~alive[:, None, :, None] & torch.eye(length, dtype=torch.bool, device=columns.device)
    if mask is None:
        if bool(alive.all()):
            swapped["attention_mask"] = None
            return swapped
        causal = torch.ones(length, length, dtype=torch.bool, device=columns.device).tril()
        swapped["attention_mask"] = (causal & alive[:, None, None, :]) | dead_rows
        return swapped
    allowed, masked = allowed_and_masked(mask)
    full = mask.expand(batch, -1, -1, -1)
    rows = full.gather(2, index[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[3]))
    gathered = rows.gather(3, index[:, None, None, :].expand(-1, full.shape[1], length, -1))
    gathered = gathered.masked_fill(~alive[:, None, None, :], masked).masked_fill(dead_rows, allowed)
    swapped["attention_mask"] = gathered
    return swapped


def gather_decode_mask(
    mask: torch.Tensor | None, columns: torch.Tensor, prefill_length: int, full_length: int
) -> torch.Tensor | None:
    """The decode mask of a shortened layer: the uncompressed mask ``(B, 1, 1, full_length)`` (or ``None``)
    at the columns the layer holds, its prefill survivors ``columns`` ``(B, L)`` (``-1``: dead) then every
    decoded token. The stock mask is sized to layer 0; where layer 0 is itself compacted (post-prefill
    eviction) it does not cover the full length, and the mask is built from the held slots alone (a
    decoded token sees every real prompt token the layer holds)."""
    batch = columns.shape[0]
    decoded = torch.arange(prefill_length, full_length, device=columns.device).expand(batch, -1)
    held = torch.cat([columns, decoded], dim=1)
    alive = held >= 0
    if mask is None or mask.shape[-1] != full_length:
        if mask is None or mask.dtype == torch.bool:
            return None if mask is None and bool(alive.all()) else alive[:, None, None, :]
        _, masked = allowed_and_masked(mask)
        return torch.zeros(alive.shape, dtype=mask.dtype, device=mask.device).masked_fill(~alive, masked)[:, None, None]
    _, masked = allowed_and_masked(mask)
    full = mask.expand(batch, -1, -1, -1)
    gathered = full.gather(3, held.clamp(min=0)[:, None, None, :].expand(-1, full.shape[1], full.shape[2], -1))
    return gathered.masked_fill(~alive[:, None, None, :], masked)


def check_cache_length(cache: Cache, index: int, columns: torch.Tensor, decoded: int) -> None:
    """Check that layer ``index`` holds its prefill survivors plus one slot per earlier decoded token."""
    held = cache.layers[index].get_seq_length()
    expected = columns.shape[1] + decoded
    if held != expected:
        raise RuntimeError(
            f"layer {index} of the compressed KV cache holds {held} slots, lightkv expected {expected}: the cache "
            "was changed outside lightkv (cropped, reordered or reused for another prompt)"
        )


def cache_argument(arguments: dict) -> Cache | None:
    """The KV cache a forward was given: ``cache`` since transformers 5.24, ``past_key_values`` before (and still
    accepted, with a deprecation warning, by 5.24's forwards), directly or inside a bound ``**kwargs``."""
    extra = arguments.get("kwargs") or {}
    for name in ("cache", "past_key_values"):
        for source in (arguments, extra):
            if source.get(name) is not None:
                return source[name]
    return None
