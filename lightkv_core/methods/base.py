"""The two interfaces an adapter drives: in-prefill token reduction (:class:`PrefillReduction`) and post-prefill
KV eviction (:class:`KVEviction`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightkv_core.compaction import StageResult
from lightkv_core.plan import LengthPlan
from lightkv_core.shards import HeadShards
from lightkv_core.spans import VisionSpan


class PrefillReduction(ABC):
    """A method that shortens the hidden states on the output of some decoder layers, in prefill.

    The adapter calls :meth:`reduce` right after each layer in :attr:`reduce_layers` has run (that layer
    has written its full KV); layers after it see, and cache, only the survivors. Decoding never reduces.
    """

    @property
    @abstractmethod
    def reduce_layers(self) -> tuple[int, ...]:
        """Decoder layers (0-based, ascending) whose output is reduced; ``-1`` means the input embeddings."""

    @property
    @abstractmethod
    def position_mode(self) -> str:
        """``"original"`` (survivors keep their position ids) or ``"compact"`` (renumbered ``0..S'-1``)."""

    @abstractmethod
    def plan_lengths(self, spans: Sequence, seq_len: int) -> LengthPlan:
        """Tokens one sample holds in each layer group, before its forward (no hidden states needed).

        Args:
            spans: the sample's vision spans (``VisionSpan`` or ``(start, end[, rows, cols])``).
            seq_len: the sample's prompt length in tokens.

        Returns:
            A :class:`~lightkv_core.plan.LengthPlan` with ``len(reduce_layers) + 1`` groups, split at
            :attr:`reduce_layers`.

        Raises:
            TypeError / ValueError naming the problem if ``spans`` do not fit a prompt of ``seq_len``.
        """

    @abstractmethod
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
        """Reduce the output of ``layer``.

        Args:
            layer: the layer that just ran (one of :attr:`reduce_layers`).
            hidden: ``(B, S, D)`` its output hidden states.
            q, k: ``(B, H, S, d)`` / ``(B, Hk, S, d)`` the post-RoPE queries and keys it used (``None`` for
                ``layer = -1``, the input embeddings, which only methods without scoring accept).
            spans: one list of vision spans per sample.
            position_ids: ``(B, S)`` or ``(3, B, S)`` position ids of the current tokens.
            attention_mask: ``(B, S)`` bool, real tokens.
            padding_side: padding side of the outputs.
            head_shards: under tensor parallelism, ``q`` and ``k`` hold this rank's heads only; scores over heads
                are summed over the ranks (:class:`~lightkv_core.shards.HeadShards`), so every rank decides alike.

        Returns:
            A :class:`~lightkv_core.stage.StageResult`.
        """

    def skip_reason(self, layer: int, spans: Sequence[VisionSpan]) -> str:
        """Why :meth:`reduce` on ``layer`` removed no vision token of a sample with ``spans`` (its vision spans
        entering the stage), for :class:`~lightkv_core.stats.StageReport`. Methods say more where they can."""
        if not spans:
            return "no vision tokens"
        return f"{type(self).__name__} removed none of its {sum(span.length for span in spans)} vision tokens"


@dataclass
class LayerEviction:
    """One layer's KV cache after a post-prefill eviction.

    Attributes:
        keys, values: ``(B, Hk, L, d)`` the kept (possibly merged) entries, in the cache's dtype.
        slots: ``(B, Hk, L)`` int64 prefill index of the token each slot holds, ascending per head; ``-1``
            marks a dead slot. Samples are left-padded with dead slots to the batch's longest; every head of
            a sample holds the same number of tokens (heads may hold different ones), so a slot is dead in
            every head or in none.
    """

    keys: torch.Tensor
    values: torch.Tensor
    slots: torch.Tensor

    @property
    def alive(self) -> torch.Tensor:
        """``(B, L)`` bool: slots that hold a token."""
        return self.slots[:, 0] >= 0


class KVEviction(ABC):
    """A method that compacts each layer's KV cache once the prefill has run (layers may end at different
    lengths); the prefill itself runs in full and decoding never evicts.

    The adapter calls :meth:`observe` right after every decoder layer with the post-RoPE ``q``/``k`` it
    used, keeps what it returns (``O(B * H * S)`` numbers per layer), and after the last layer calls
    :meth:`evict` with those observations and every layer's cache. Budgets are vision-token retention:
    vision KV entries kept, summed over layers, over (vision tokens x layers).
    """

    position_mode = "original"

    @abstractmethod
    def observe(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, spans: Sequence, *, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Attention statistics of ``layer`` that :meth:`evict` needs later.

        Args:
            layer: the layer that just ran.
            q, k: ``(B, H, S, d)`` / ``(B, Hk, S, d)`` its post-RoPE queries and keys (scaled so that
                ``d ** -0.5`` reproduces its logits).
            spans: one list of vision spans per sample.
            attention_mask: ``(B, S)`` bool, real tokens (left padding).
        """

    @abstractmethod
    def evict(
        self,
        observations: Sequence[torch.Tensor],
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        spans: Sequence,
        *,
        attention_mask: torch.Tensor,
    ) -> list[LayerEviction]:
        """Compact every layer's cache.

        Args:
            observations: what :meth:`observe` returned, one per layer, in layer order.
            keys, values: ``(B, Hk, S, d)`` each layer's full prefill cache.
            spans, attention_mask: as for :meth:`observe`.

        Returns:
            One :class:`LayerEviction` per layer.
        """
