"""LOOK-M (Wan et al., 2024): text-prior KV eviction, with every evicted entry merged into a kept one.

The choices made where the paper is open are in :class:`LookM`'s docstring; README, "Methods".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightkv_core.budget import apportion
from lightkv_core.kernels.launch import check_backend
from lightkv_core.methods.base import KVEviction, LayerEviction
from lightkv_core.methods.eviction import (
    DEFAULT_RETENTION,
    check_observations,
    compact_layer,
    read_observations,
    retained_total,
    token_classes,
    top_indices,
)
from lightkv_core.methods.fields import check_choice, check_fraction, check_integer
from lightkv_core.methods.received import received_attention

MERGES = ("pivotal", "averaged", "weighted", "none")


def merge_into_pivots(
    keys: torch.Tensor, values: torch.Tensor, kept: torch.Tensor, evicted: torch.Tensor, merge: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the evicted entries of one head into their most cosine-similar kept key.

    Args:
        keys, values: ``(S, d)`` one head's cache.
        kept, evicted: 1-D int64 indices (disjoint), on the cache's device or the host.
        merge: one of :data:`MERGES`.

    Returns:
        ``(keys, values)`` float32 copies with the kept entries updated.
    """
    keys32, values32 = keys.float().clone(), values.float().clone()
    kept, evicted = kept.to(keys.device), evicted.to(keys.device)
    if merge == "none" or evicted.numel() == 0 or kept.numel() == 0:
        return keys32, values32
    unit = keys32 / (keys32.norm(dim=1, keepdim=True) + 1e-8)
    similarity = unit[evicted] @ unit[kept].T  # (E, K)
    best, pivot = similarity.max(dim=1)  # ties: the lowest kept index
    if merge == "weighted":
        weight = best.clamp(min=0)
    elif merge == "averaged":
        weight = torch.ones_like(best)
    else:  # pivotal: each pivot's merged entries share a weight of 1
        counts = torch.zeros(kept.numel(), device=keys.device).index_add_(0, pivot, torch.ones_like(best))
        weight = 1.0 / counts[pivot]
    for cache in (keys32, values32):
        total = torch.zeros(kept.numel(), cache.shape[1], device=cache.device)
        total.index_add_(0, pivot, weight[:, None] * cache[evicted])
        mass = torch.zeros(kept.numel(), device=cache.device).index_add_(0, pivot, weight)
        cache[kept] = (cache[kept] + total) / (1 + mass[:, None])  # a pivot receiving nothing stays as it is
    return keys32, values32


@dataclass(frozen=True)
class LookM(KVEviction):
    """LOOK-M: keep text and a recent window, the most-attended vision tokens per head, merge the rest.

    Per layer and KV head: every text token and the last ``recent`` real tokens are kept; the other vision
    tokens are ranked by the attention they receive (post-softmax, causal, summed over every real query,
    averaged over the query heads that share the KV head) and the top ones are kept, so that the layer holds
    exactly its share of the budget (the released code can exceed it). Each evicted key is then merged,
    with its value, into the kept key of the same head it is most cosine-similar to. For a kept entry ``c``
    receiving the evicted set ``M(c)`` (keys and values alike, in float32):

    * ``"averaged"``: ``x_c <- (x_c + sum_e x_e) / (1 + |M(c)|)``;
    * ``"pivotal"`` (default): ``x_c <- (x_c + mean_e x_e) / 2``, the kept entry is the pivot and holds half
      the weight whatever the number merged;
    * ``"weighted"``: ``x_c <- (x_c + sum_e w_e x_e) / (1 + sum_e w_e)`` with ``w_e`` the cosine similarity of
      ``e`` to ``c`` (negative counts as 0);
    * ``"none"``: eviction only.

    Budget: ``retention`` of the mergeable vision tokens over all layers, split equally over layers (counts
    differ by at most one). Vision tokens inside the recent window count toward a layer's share; if they
    alone exceed it, the most recent of them are kept.

    ``recent``: real tokens at the end of the prompt always kept (the released code uses a window of this
    kind; 8 fits short VQA prompts). ``merge``: one of :data:`MERGES`.
    """

    retention: float = DEFAULT_RETENTION
    recent: int = 8
    merge: str = "pivotal"
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_fraction("LookM", "retention", self.retention)
        check_integer("LookM", "recent", self.recent, 0)
        check_choice("LookM", "merge", self.merge, MERGES)
        check_backend("LookM", self.backend)

    def observe(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, spans: Sequence, *, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """``(B, Hk, S)`` float32 attention each key receives, summed over real queries, averaged over the
        query heads of each KV head."""
        per_head = received_attention(q, k, attention_mask, heads="per_head", backend=self.backend)
        batch, heads, seq = per_head.shape
        return per_head.view(batch, k.shape[1], heads // k.shape[1], seq).mean(dim=2)

    def evict(
        self,
        observations: Sequence[torch.Tensor],
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        spans: Sequence,
        *,
        attention_mask: torch.Tensor,
    ) -> list[LayerEviction]:
        check_observations(observations, keys, values)
        real = attention_mask.to(torch.bool)
        real, evictable, importance = read_observations(real, token_classes(spans, real)[1], observations)
        rank_from_end = real.flip(1).long().cumsum(dim=1).flip(1)  # 1 on the last real token
        in_window = real & (rank_from_end <= self.recent)
        layers = len(observations)
        batch, kv_heads = keys[0].shape[:2]
        sizes = []
        for b in range(batch):
            n = int(evictable[b].sum())
            sizes.append(apportion([1.0] * layers, retained_total(self.retention, n, layers), [n] * layers))
        evicted_layers = []
        for layer, (layer_keys, layer_values) in enumerate(zip(keys, values, strict=True)):
            device = layer_keys.device
            keep = (real & ~evictable)[:, None].repeat(1, kv_heads, 1)
            merged_keys = torch.empty(layer_keys.shape, dtype=torch.float32, device=device)  # all written below
            merged_values = torch.empty(layer_values.shape, dtype=torch.float32, device=device)
            for b in range(batch):
                forced = (evictable[b] & in_window[b]).nonzero().squeeze(1)
                ranked = (evictable[b] & ~in_window[b]).nonzero().squeeze(1)
                size = sizes[b][layer]
                for h in range(kv_heads):
                    if size <= forced.numel():
                        chosen = forced[forced.numel() - size :]
                    else:
                        top = ranked[top_indices(importance[layer, b, h, ranked], size - forced.numel())]
                        chosen = torch.cat([forced, top])
                    keep[b, h, chosen] = True
                    evicted = (evictable[b] & ~keep[b, h]).nonzero().squeeze(1)
                    merged_keys[b, h], merged_values[b, h] = merge_into_pivots(
                        layer_keys[b, h], layer_values[b, h], keep[b, h].nonzero().squeeze(1), evicted, self.merge
                    )
            dtype = layer_keys.dtype
            evicted_layers.append(compact_layer(merged_keys.to(dtype), merged_values.to(dtype), keep))
        return evicted_layers
