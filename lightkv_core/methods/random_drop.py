"""Random vision-token dropping: the floor every scoring method must beat."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightkv_core.methods.base import PrefillReduction
from lightkv_core.methods.fastv import _check_ratio, keep_top_vision
from lightkv_core.stage import StageResult, drop_tokens


@dataclass(frozen=True)
class RandomDrop(PrefillReduction):
    """On the output of ``layer``, drop a random fraction ``ratio`` of each sample's vision tokens (the
    same count as :class:`~lightkv_core.methods.fastv.FastV` keeps, chosen uniformly). Draws come from a
    generator seeded with ``seed`` at every call, so a run is reproducible."""

    layer: int
    ratio: float
    seed: int = 0
    positions: str = "original"

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")
        _check_ratio(self.ratio)

    @property
    def reduce_layers(self) -> tuple[int, ...]:
        return (self.layer,)

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
    ) -> StageResult:
        generator = torch.Generator().manual_seed(self.seed)
        scores = torch.rand(hidden.shape[:2], generator=generator)
        keep = keep_top_vision(scores, spans, self.ratio, attention_mask)
        return drop_tokens(
            hidden,
            keep,
            spans,
            positions=self.positions,
            position_ids=position_ids,
            attention_mask=attention_mask,
            padding_side=padding_side,
        )
