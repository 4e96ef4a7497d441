"""Random vision-token dropping: the floor every scoring method must beat."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightkv_core.compaction import StageResult
from lightkv_core.methods.base import PrefillReduction
from lightkv_core.methods.fastv import check_drop_method, check_layer, drop_lowest, drop_plan
from lightkv_core.methods.fields import check_integer
from lightkv_core.plan import LengthPlan
from lightkv_core.shards import HeadShards


@dataclass(frozen=True)
class RandomDrop(PrefillReduction):
    """On the output of ``layer``, drop a random fraction ``ratio`` of each sample's vision tokens (the
    same count as :class:`~lightkv_core.methods.fastv.FastV` keeps, chosen uniformly). ``layer = -1``
    drops on the input embeddings, before layer 0 (needs no q/k; every layer then holds only the
    survivors). Draws come from a generator seeded with ``seed`` at every call, so a run is reproducible."""

    layer: int
    ratio: float
    seed: int = 0
    positions: str = "original"

    def __post_init__(self) -> None:
        check_drop_method("RandomDrop", self.layer, self.ratio, self.positions, lowest_layer=-1)
        check_integer("RandomDrop", "seed", self.seed, -(2**63), 2**64 - 1)  # the range torch.Generator takes

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
        q: torch.Tensor | None,
        k: torch.Tensor | None,
        spans: Sequence,
        *,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        padding_side: str,
        head_shards: HeadShards | None = None,
    ) -> StageResult:
        """Random scores from :attr:`seed`, the same on every rank (``head_shards`` is not needed)."""
        check_layer(self, layer)
        generator = torch.Generator().manual_seed(self.seed)
        scores = torch.rand(hidden.shape[:2], generator=generator)
        return drop_lowest(
            hidden, scores, spans, self.ratio, self.positions, position_ids, attention_mask, padding_side
        )
