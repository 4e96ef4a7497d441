"""FastV (Chen et al., 2024): after layer ``K - 1``, keep only the vision tokens the text attends to most."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightkv_core.compaction import StageResult, drop_tokens
from lightkv_core.config import POSITION_MODES
from lightkv_core.kernels.launch import check_backend
from lightkv_core.methods.base import PrefillReduction
from lightkv_core.methods.fields import check_choice, check_fraction, check_integer
from lightkv_core.methods.received import received_attention
from lightkv_core.plan import LengthPlan
from lightkv_core.shards import HeadShards
from lightkv_core.spans import check_sample_spans, normalise_spans

SCORINGS = ("last_token", "all_tokens")
RELEASED_K, RELEASED_DEPTH = 2, 32


def released_layer(num_layers: int) -> int:
    """The layer whose output FastV prunes (``K - 1``): the released ``K = 2`` of 32 layers scaled to the
    depth (at least layer 0)."""
    return max(0, round(RELEASED_K * num_layers / RELEASED_DEPTH) - 1)


def drop_ratio(num_layers: int, layer: int, retention: float) -> float | None:
    """Fraction of vision tokens one drop after ``layer`` (``-1``: the embeddings) removes so that the
    vision KV summed over layers is ``retention`` of the full one; ``None`` if out of reach (no layer after
    ``layer``, or ``retention`` below what the layers up to it keep)."""
    if layer >= num_layers - 1:
        return None
    keep = (retention * num_layers - (layer + 1)) / (num_layers - layer - 1)
    return None if keep < 0 else 1.0 - min(1.0, keep)


def kept_count(ratio: float, tokens: int) -> int:
    """Vision tokens kept when a fraction ``ratio`` of ``tokens`` is dropped: ``ceil((1 - ratio) * n)``."""
    return min(tokens, math.ceil((1.0 - ratio) * tokens - 1e-9))


def drop_plan(spans: Sequence, seq_len: int, ratio: float) -> LengthPlan:
    """Exact two-group plan of one drop (see :func:`keep_top_vision`): the prompt of ``seq_len`` tokens,
    then the same without the ``n - kept_count(ratio, n)`` dropped vision tokens (``n``: mergeable vision
    tokens over all the sample's ``spans``; structural tokens are kept)."""
    vision = sum(span.num_mergeable() for span in check_sample_spans(spans, seq_len))
    return LengthPlan.exactly((seq_len, seq_len - vision + kept_count(ratio, vision)))


def keep_top_vision(scores: torch.Tensor, spans: Sequence, ratio: float, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, S)`` bool keep mask: all non-vision and structural tokens, plus the ``kept_count(ratio, n)``
    mergeable vision tokens of each sample (``n`` over all its images) with the highest ``scores``
    (``(B, S)``; ties: lower index). Runs on ``scores``' device; the candidates come from the spans (host)."""
    keep = attention_mask.to(scores.device, torch.bool).clone()
    scores = scores.detach().float()
    _, per_sample = normalise_spans(spans, keep.shape[0])
    for b, sample_spans in enumerate(per_sample):
        candidates = []
        for span in sample_spans:
            index = span.start + span.mergeable_or_default().nonzero().squeeze(1)
            candidates.append(index)
        if not candidates:
            continue
        index = torch.cat(candidates).to(scores.device)
        keep[b, index] = False
        order = torch.argsort(-scores[b, index], stable=True)
        keep[b, index[order[: kept_count(ratio, index.numel())]]] = True
    return keep


def check_drop_method(owner: str, layer: int, ratio: float, positions: str, lowest_layer: int = 0) -> None:
    """Constructor checks shared by the dropping methods (``owner``: the method's name, for the messages)."""
    check_integer(owner, "layer", layer, lowest_layer)
    check_fraction(owner, "ratio", ratio)
    check_choice(owner, "positions", positions, POSITION_MODES)


def check_layer(method: PrefillReduction, layer: int) -> None:
    if layer not in method.reduce_layers:
        raise ValueError(f"layer {layer} is not one of this method's layers {method.reduce_layers}")


@dataclass(frozen=True)
class FastV(PrefillReduction):
    """FastV: on the output of ``layer`` (``K - 1`` in the paper's terms; layers ``>= K`` hold the
    survivors), drop the fraction ``ratio`` (``R``) of vision tokens with the lowest attention score.

    Score of a vision key: post-softmax causal attention it receives, averaged over heads, from
    ``scoring="last_token"`` (the last real token, as the released code does) or ``"all_tokens"``
    (averaged over every real query, the paper's description). ``positions``: ``"original"`` (survivors
    keep their position ids) or ``"compact"``. ``backend``: the attention-statistics kernel's.
    """

    layer: int
    ratio: float
    scoring: str = "last_token"
    positions: str = "original"
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_drop_method("FastV", self.layer, self.ratio, self.positions)
        check_choice("FastV", "scoring", self.scoring, SCORINGS)
        check_backend("FastV", self.backend)

    @property
    def position_mode(self) -> str:
        return self.positions

    @property
    def reduce_layers(self) -> tuple[int, ...]:
        return (self.layer,)

    def plan_lengths(self, spans: Sequence, seq_len: int) -> LengthPlan:
        return drop_plan(spans, seq_len, self.ratio)

    def reduce(
        self,
        layer: int,
        hidden: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        spans: Sequence,
        *,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        padding_side: str,
        head_shards: HeadShards | None = None,
    ) -> StageResult:
        check_layer(self, layer)
        scores = mean_received_attention(
            q, k, attention_mask, last_token_only=self.scoring == "last_token", backend=self.backend
        )
        if head_shards is not None:
            scores = head_shards.mean(scores)
        return drop_lowest(
            hidden, scores, spans, self.ratio, self.positions, position_ids, attention_mask, padding_side
        )


def drop_lowest(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    spans: Sequence,
    ratio: float,
    positions: str,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    padding_side: str,
) -> StageResult:
    """Drop the fraction ``ratio`` of each sample's vision tokens with the lowest ``scores`` ``(B, S)``
    (see :func:`keep_top_vision`); the rest as for :func:`~lightkv_core.stage.drop_tokens`."""
    keep = keep_top_vision(scores, spans, ratio, attention_mask)
    return drop_tokens(
        hidden,
        keep,
        spans,
        positions=positions,
        position_ids=position_ids,
        attention_mask=attention_mask,
        padding_side=padding_side,
    )


def mean_received_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    last_token_only: bool,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``(B, S)`` float32 post-softmax causal attention each key receives, averaged over heads and over
    the queries (the last real one, or every real one). Padding keys and queries take no part; a sample
    without real tokens scores 0. Streams through :func:`~lightkv_core.kernels.attention_statistics`
    (never ``S x S``).

    Args:
        q: ``(B, H, S, d)``; k: ``(B, Hk, S, d)`` with ``H % Hk == 0``; attention_mask: ``(B, S)`` bool.
        backend: the kernel's, ``"auto"``, ``"triton"`` or ``"torch"``.
    """
    received = received_attention(q, k, attention_mask, last_token_only=last_token_only, scale=scale, backend=backend)
    if last_token_only:
        return received
    return received / attention_mask.to(received.device, torch.bool).sum(dim=1, keepdim=True).clamp(min=1)
