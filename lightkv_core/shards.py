"""Attention heads split over tensor-parallel ranks: :class:`HeadShards`.

Under tensor parallelism each rank holds ``H / ranks`` query heads (and as many of the key heads) of every layer,
while the hidden states are the same on every rank. A method's guide scores are sums (LightKV) or means (FastV)
over heads, so each rank's partial scores, summed over the ranks (``B * S`` floats), give every rank the scores of
all heads; every rank then makes the same merge or drop decisions on the same hidden states.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HeadShards:
    """This rank's share of the attention heads.

    Attributes:
        ranks: processes the heads are split over, evenly (``H % ranks == 0``).
        all_reduce_sum: ``all_reduce_sum(t)``: ``t`` summed over the ranks, the same tensor on every rank (e.g.
            ``torch.distributed.all_reduce`` over the tensor-parallel group); may work in place and return ``t``.
    """

    ranks: int
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]

    def __post_init__(self) -> None:
        if isinstance(self.ranks, bool) or not isinstance(self.ranks, int) or self.ranks < 1:
            raise ValueError(f"HeadShards.ranks must be an integer >= 1, got {self.ranks!r}")

    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        """A sum over this rank's heads made a sum over all heads."""
        return self.all_reduce_sum(partial)

    def mean(self, partial: torch.Tensor) -> torch.Tensor:
        """A mean over this rank's heads made a mean over all heads (every rank holds as many)."""
        return self.all_reduce_sum(partial) / self.ranks
