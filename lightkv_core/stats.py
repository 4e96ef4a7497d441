"""What a compressed prefill did, reported the same way by every adapter."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillStats:
    """Per-layer KV accounting of one prefill. Token counts are int64 CPU tensors.

    Attributes:
        kv_tokens: ``(layers, B)`` real tokens each layer holds in its KV cache after the prefill
            (padding and dead slots not counted).
        vision_tokens: ``(layers, B)`` of those, vision tokens (a merged token counts once).
        original_tokens: ``(B,)`` real tokens of the prompt.
        original_vision_tokens: ``(B,)`` vision tokens of the prompt.
        reduce_seconds: wall time spent in the method (scoring, grouping, merging, compaction).
        prefill_seconds: wall time of the whole prefill.
        bytes_per_token_layer: KV bytes one token costs in one layer (``2 * kv_heads * head_dim *
            bytes per value``); ``0`` where the caller does not know it.
    """

    kv_tokens: torch.Tensor
    vision_tokens: torch.Tensor
    original_tokens: torch.Tensor
    original_vision_tokens: torch.Tensor
    reduce_seconds: float
    prefill_seconds: float
    bytes_per_token_layer: int = 0

    @property
    def num_layers(self) -> int:
        return self.kv_tokens.shape[0]

    def vision_retention(self) -> torch.Tensor:
        """``(B,)`` vision tokens held in the KV summed over layers / (original vision tokens x layers);
        NaN for a sample without vision tokens."""
        return self.vision_tokens.sum(dim=0).double() / (self.original_vision_tokens.double() * self.num_layers)

    def kv_bytes(self) -> torch.Tensor:
        """``(B,)`` KV bytes held after the prefill."""
        return self.kv_tokens.sum(dim=0) * self.bytes_per_token_layer

    def full_kv_bytes(self) -> torch.Tensor:
        """``(B,)`` KV bytes the same prompt holds without compression."""
        return self.original_tokens * self.num_layers * self.bytes_per_token_layer

    def kv_bytes_saved(self) -> torch.Tensor:
        """``(B,)`` KV bytes the compression saved."""
        return self.full_kv_bytes() - self.kv_bytes()
