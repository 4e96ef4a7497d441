"""AirCache (Huang et al., 2025): vision KV kept by an elite observation window, with layer budgets from the
strength and skewness of each layer's importance distribution.

There is no public code; the choices made where the paper is open are in :class:`AirCache`'s docstring; README,
"Methods".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightkv_core.budget import apportion
from lightkv_core.kernels.launch import check_backend
from lightkv_core.methods.base import KVEviction, LayerEviction
from lightkv_core.methods.eviction import DEFAULT_RETENTION, evict_top_per_layer, token_classes
from lightkv_core.methods.fields import check_fraction
from lightkv_core.methods.received import received_attention


def skewness(values: torch.Tensor) -> float:
    """Third standardised moment of a 1-D tensor; 0 for fewer than 2 values or zero spread."""
    values = values.double()
    if values.numel() < 2:
        return 0.0
    centred = values - values.mean()
    spread = centred.pow(2).mean().sqrt()
    if float(spread) <= 1e-12 * max(1.0, float(values.abs().max())):
        return 0.0
    return float(centred.pow(3).mean() / spread**3)


def layer_weights(importance: torch.Tensor) -> list[float]:
    """Per-layer budget weights from ``(L, n)`` vision importances: mean of normalised strength and skewness."""
    strength = importance.double().sum(dim=1).clamp(min=0)
    skew = torch.tensor([max(0.0, skewness(row)) for row in importance], dtype=torch.float64)
    layers = importance.shape[0]

    def normalised(v: torch.Tensor) -> torch.Tensor:
        return v / v.sum() if float(v.sum()) > 0 else torch.full((layers,), 1.0 / layers, dtype=torch.float64)

    return ((normalised(strength) + normalised(skew)) / 2).tolist()


@dataclass(frozen=True)
class AirCache(KVEviction):
    """AirCache: keep each layer's most important vision keys, ``retention`` of the vision KV over all layers.

    Where the paper leaves a choice open (there is no public code), this class chooses as follows:

    * the elite window is chosen per layer, from that layer's attention of the last real token (averaged over
      heads, softmax over every real key it sees), among the text tokens (every real token outside a vision
      span, the last token included);
    * an elite query's attention to a vision key is a softmax over the vision keys and the elite keys it can
      see (causal), averaged over heads; a key's importance is the mean over elite queries;
    * a layer's *strength* is the sum of its vision importances and its *skewness* the third standardised
      moment of them (0 where they are all equal); negative skewness counts as 0. Each is normalised to sum
      1 over layers (all zero: equal shares) and a layer's budget is proportional to their mean.

    ``alpha``: a text token joins the elite window when the last token's attention to it is at least
    ``alpha`` times the largest such attention. Non-vision tokens and structural vision tokens are kept.
    """

    retention: float = DEFAULT_RETENTION
    alpha: float = 0.9
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_fraction("AirCache", "retention", self.retention)
        check_fraction("AirCache", "alpha", self.alpha, zero=False)
        check_backend("AirCache", self.backend)

    def elite(self, q: torch.Tensor, k: torch.Tensor, vision: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` bool elite observation window of one layer."""
        last = received_attention(q, k, real, last_token_only=True, backend=self.backend)
        text = real & ~vision
        last = last.masked_fill(~text, -1.0)
        best = last.max(dim=1, keepdim=True).values
        return text & (last >= self.alpha * best)

    def observe(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, spans: Sequence, *, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """``(B, S)`` float32 importance of every vision key (0 elsewhere)."""
        real = attention_mask.to(q.device, torch.bool)
        vision, _ = token_classes(spans, real)
        elite = self.elite(q, k, vision, real)
        summed = received_attention(q, k, real, queries=elite, key_mask=vision | elite, backend=self.backend)
        return (summed / elite.sum(dim=1, keepdim=True).clamp(min=1)).masked_fill(~vision, 0.0)

    def evict(
        self,
        observations: Sequence[torch.Tensor],
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        spans: Sequence,
        *,
        attention_mask: torch.Tensor,
    ) -> list[LayerEviction]:
        real = attention_mask.to(torch.bool)
        _, candidates = token_classes(spans, real)
        return evict_top_per_layer(observations, keys, values, candidates, real, self.retention, self.layer_sizes)

    @staticmethod
    def layer_sizes(importance: torch.Tensor, budget: int) -> list[int]:
        """Per-layer kept vision tokens for one sample: ``budget`` split by :func:`layer_weights`."""
        layers, candidates = importance.shape
        return apportion(layer_weights(importance), budget, [candidates] * layers)
