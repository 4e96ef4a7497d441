"""PrefixKV (Wang et al., 2024): layer-wise KV budgets from one shared cumulative-attention threshold."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lightkv_core.budget import apportion
from lightkv_core.kernels.launch import check_backend
from lightkv_core.methods.base import KVEviction, LayerEviction
from lightkv_core.methods.eviction import DEFAULT_RETENTION, evict_top_per_layer, token_classes
from lightkv_core.methods.fields import check_choice, check_fraction, check_fractions, check_integer
from lightkv_core.methods.received import received_attention

SCOPES = ("vision", "all")
SEARCH_STEPS = 60
CALIBRATION_FORMAT = "lightkv-prefixkv-calibration/1"


def prefix_sizes(cumulative: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(L,)`` int64: per layer, the smallest prefix of its sorted, normalised importances whose mass
    reaches ``threshold`` (0 for ``threshold <= 0``).

    Args:
        cumulative: ``(L, n)`` float64 cumulative sums of each layer's importances sorted in descending
            order and normalised to sum 1.
    """
    layers, candidates = cumulative.shape
    if threshold <= 0 or candidates == 0:
        return torch.zeros(layers, dtype=torch.long)
    bound = torch.full((layers, 1), threshold, dtype=cumulative.dtype)
    return (torch.searchsorted(cumulative, bound).squeeze(1) + 1).clamp(max=candidates)


def cumulative_mass(importance: torch.Tensor) -> torch.Tensor:
    """``(L, n)`` float64 cumulative mass of each layer's importances ``(L, n)``, sorted in descending
    order and normalised to sum 1 (a layer without mass counts every token equally)."""
    ordered = importance.double().sort(dim=1, descending=True).values.clamp(min=0)
    mass = ordered.sum(dim=1, keepdim=True)
    ordered = torch.where(mass > 0, ordered / mass.clamp(min=1e-300), 1.0 / max(1, ordered.shape[1]))
    return ordered.cumsum(dim=1)


def search_sizes(importance: torch.Tensor, budget: int, steps: int = SEARCH_STEPS) -> tuple[list[int], float]:
    """Per-layer kept counts summing to ``budget`` and the shared threshold ``p`` they came from.

    Binary search for the smallest ``p`` in ``[0, 1]`` whose prefix sizes (:func:`prefix_sizes`) total at
    least ``budget``; those sizes are then rescaled to hit ``budget`` exactly (:func:`apportion`).

    Args:
        importance: ``(L, n)`` each layer's importance of the ``n`` candidate tokens.
        budget: entries to keep over all layers, ``0 <= budget <= L * n``.
    """
    layers, candidates = importance.shape
    cumulative = cumulative_mass(importance)
    low, high = 0.0, 1.0
    for _ in range(steps):
        middle = (low + high) / 2
        if int(prefix_sizes(cumulative, middle).sum()) >= budget:
            high = middle
        else:
            low = middle
    sizes = prefix_sizes(cumulative, high).tolist()
    if sum(sizes) < budget:  # float rounding left the top of the search a token short
        sizes = [candidates] * layers
    return apportion(sizes, budget, [candidates] * layers), high


@dataclass(frozen=True)
class PrefixKV(KVEviction):
    """PrefixKV: keep, per layer, the most-attended tokens, with layer sizes set by one shared threshold.

    Importance of a key in a layer: post-softmax causal attention it receives, averaged over heads and
    summed over every real query. Sizes come from :func:`search_sizes` on each request (``fractions``
    ``None``) or, in calibrated mode, from per-layer kept fractions measured on calibration prompts
    (:meth:`from_calibration`), rescaled to this request's budget. The budget is ``retention`` of the
    candidate tokens summed over layers: the mergeable vision tokens (``scope="vision"``) or every real
    token (``scope="all"``). The first ``sink`` real tokens and the last real token are always kept and
    are never candidates.
    """

    retention: float = DEFAULT_RETENTION
    scope: str = "vision"
    sink: int = 4
    fractions: tuple[float, ...] | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_fraction("PrefixKV", "retention", self.retention)
        check_choice("PrefixKV", "scope", self.scope, SCOPES)
        check_integer("PrefixKV", "sink", self.sink, 0)
        if self.fractions is not None:
            object.__setattr__(self, "fractions", check_fractions("PrefixKV", "fractions", self.fractions))
        check_backend("PrefixKV", self.backend)

    @classmethod
    def from_calibration(cls, path: str | Path, retention: float | None = None, backend: str = "auto") -> PrefixKV:
        """Calibrated PrefixKV from a file written by :func:`save_calibration` (``lightkv calibrate``);
        ``retention`` defaults to the one it was calibrated at."""
        data = json.loads(Path(path).read_text())
        if data.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"{path} is not a PrefixKV calibration file (format {CALIBRATION_FORMAT})")
        return cls(
            retention=data["retention"] if retention is None else retention,
            scope=data["scope"],
            sink=data["sink"],
            fractions=tuple(data["fractions"]),
            backend=backend,
        )

    def observe(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, spans: Sequence, *, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """``(B, S)`` float32 attention received by each key, averaged over heads, summed over real queries."""
        return received_attention(q, k, attention_mask, backend=self.backend)

    def candidates(self, spans: Sequence, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, S)`` bool: tokens that may be evicted."""
        real = attention_mask.to(torch.bool)
        vision, evictable = token_classes(spans, real)
        candidates = evictable if self.scope == "vision" else real.clone()
        rank = real.long().cumsum(dim=1)
        candidates &= rank > self.sink
        candidates &= rank < rank[:, -1:]  # the last real token (left padding: the last slot)
        return candidates

    def layer_sizes(self, importance: torch.Tensor, budget: int) -> list[int]:
        """Per-layer kept candidates for one sample: searched, or the calibrated fractions rescaled."""
        layers, candidates = importance.shape
        if self.fractions is None:
            return search_sizes(importance, budget)[0]
        if len(self.fractions) != layers:
            raise ValueError(f"the calibration has {len(self.fractions)} layers, this model {layers}")
        return apportion(list(self.fractions), budget, [candidates] * layers)

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
        candidates = self.candidates(spans, real)
        return evict_top_per_layer(observations, keys, values, candidates, real, self.retention, self.layer_sizes)


def save_calibration(path: str | Path, fractions: Sequence[float], method: PrefixKV, prompts: int, model: str) -> None:
    """Write per-layer kept fractions (averaged over ``prompts`` calibration prompts) for
    :meth:`PrefixKV.from_calibration`."""
    data = {
        "format": CALIBRATION_FORMAT,
        "retention": method.retention,
        "scope": method.scope,
        "sink": method.sink,
        "num_layers": len(fractions),
        "fractions": [round(float(f), 6) for f in fractions],
        "prompts": prompts,
        "model": model,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
