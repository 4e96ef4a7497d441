"""The interface every in-prefill token-reduction method shares, so an adapter can drive any of them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from lightkv_core.stage import StageResult


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

        Returns:
            A :class:`~lightkv_core.stage.StageResult`.
        """
