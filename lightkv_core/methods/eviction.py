"""Pieces the post-prefill eviction methods (PrefixKV, AirCache, LOOK-M) share: token classes, the global
budget, top-k selection and the compaction of a layer's cache into :class:`LayerEviction` slots."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lightkv_core.methods.base import LayerEviction
from lightkv_core.spans import normalise_spans

DEFAULT_RETENTION = 0.55  # about what LightKV's released LLaVA schedule keeps (0.57 at 32 layers)


def check_observations(observations: Sequence, keys: Sequence, values: Sequence) -> None:
    if not len(observations) == len(keys) == len(values) or not keys:
        raise ValueError(
            f"evict needs one observation, key and value tensor per layer, got {len(observations)}, {len(keys)} "
            f"and {len(values)}"
        )


def token_classes(spans: Sequence, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vision, evictable)``, each ``(B, S)`` bool on ``attention_mask``'s device: every real token inside a
    vision span, and of those the mergeable ones (structural tokens such as LLaVA-NeXT row newlines are
    always kept)."""
    real = attention_mask.to(torch.bool)
    batch, seq = real.shape
    _, per_sample = normalise_spans(spans, batch)
    vision = torch.zeros(batch, seq, dtype=torch.bool)
    evictable = torch.zeros(batch, seq, dtype=torch.bool)
    for b, sample_spans in enumerate(per_sample):
        for span in sample_spans:
            vision[b, span.start : span.end] = True
            evictable[b, span.start : span.end] = span.mergeable_or_default()
    vision, evictable = vision.to(real.device) & real, evictable.to(real.device) & real
    return vision, evictable


def retained_total(retention: float, candidates: int, num_layers: int) -> int:
    """Entries kept over all layers: ``round(retention * candidates * num_layers)``."""
    return min(candidates * num_layers, round(retention * candidates * num_layers))


def top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest ``scores`` (1-D; ties: lower index)."""
    return torch.argsort(-scores.float(), stable=True)[:count]


def slots_from_keep(keep: torch.Tensor) -> torch.Tensor:
    """``(B, G, L)`` int64 slots from a ``(B, G, S)`` bool keep mask: kept indices ascending, each sample
    left-padded with ``-1`` to the longest; every group ``G`` of a sample must keep the same count."""
    counts = keep.sum(dim=-1)
    if bool((counts != counts[:, :1]).any()):
        raise ValueError("every head of a sample must keep the same number of tokens")
    length = int(counts.max()) if counts.numel() else 0
    seq = keep.shape[-1]
    order = torch.argsort(keep.to(torch.int8), dim=-1, stable=True)[..., seq - length :]
    alive = torch.arange(length, device=keep.device) >= (length - counts)[..., None]
    return torch.where(alive, order, -1)


def evict_top_per_layer(
    observations: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    candidates: torch.Tensor,
    attention_mask: torch.Tensor,
    retention: float,
    layer_sizes: Callable[[torch.Tensor, int], list[int]],
) -> list[LayerEviction]:
    """Keep, per layer, the highest-scoring candidates (the same tokens in every head), every other real token,
    and compact each layer's cache.

    Args:
        observations: ``(B, S)`` per layer, each key's score.
        keys, values: ``(B, Hk, S, d)`` per layer.
        candidates: ``(B, S)`` bool, tokens that may be evicted.
        attention_mask: ``(B, S)`` bool, real tokens.
        retention: the sample's budget is ``retained_total(retention, candidates, layers)``.
        layer_sizes: ``(importance (L, n), budget) -> L counts summing to budget`` for one sample.
    """
    check_observations(observations, keys, values)
    real, candidates, importance = read_observations(attention_mask, candidates, observations)
    layers = len(observations)
    keep = real[None].repeat(layers, 1, 1) & ~candidates[None]
    for b in range(real.shape[0]):
        index = candidates[b].nonzero().squeeze(1)
        sizes = layer_sizes(importance[:, b, index], retained_total(retention, index.numel(), layers))
        for layer, size in enumerate(sizes):
            keep[layer, b, index[top_indices(importance[layer, b, index], size)]] = True
    return [compact_layer(k, v, keep[i]) for i, (k, v) in enumerate(zip(keys, values, strict=True))]


def read_observations(
    attention_mask: torch.Tensor, candidates: torch.Tensor, observations: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host copies of ``attention_mask`` and ``candidates`` ``(B, S)`` (as bool) and of the ``L`` observations
    (each ``(B, ...)``; returned stacked, ``(L, B, ...)`` float32), in one device-to-host copy: an eviction's one
    host synchronisation."""
    device = observations[0].device
    parts = [attention_mask, candidates, *observations]
    packed = torch.cat([part.to(device, torch.float32).reshape(-1) for part in parts]).cpu()
    masks, values = packed[: 2 * candidates.numel()].view(2, *candidates.shape), packed[2 * candidates.numel() :]
    return masks[0].bool(), masks[1].bool(), values.view(len(observations), *observations[0].shape)


def compact_layer(keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> LayerEviction:
    """Keep the marked entries of one layer's cache.

    Args:
        keys, values: ``(B, Hk, S, d)``.
        keep: ``(B, S)`` (the same tokens in every head) or ``(B, Hk, S)`` bool; on the host, the slots are
            planned there and copied over without waiting for the device.
    """
    batch, kv_heads, _, dim = keys.shape
    if keep.dim() == 2:
        keep = keep[:, None]
    slots = slots_from_keep(keep).to(keys.device).expand(batch, kv_heads, -1)
    index = slots.clamp(min=0)[..., None].expand(-1, -1, -1, dim)
    alive = (slots >= 0)[..., None]
    kept_keys = keys.gather(2, index).masked_fill(~alive, 0)
    kept_values = values.gather(2, index).masked_fill(~alive, 0)
    return LayerEviction(kept_keys, kept_values, slots.contiguous())
