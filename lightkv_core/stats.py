"""What a compressed prefill did, reported the same way by every adapter."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StageReport:
    """What one in-prefill stage did to each sample of a batch.

    Attributes:
        layer: the decoder layer whose output the stage reduced.
        vision_before: per sample, vision tokens entering the stage.
        vision_after: per sample, vision tokens leaving it (a merged token counts once).
        skipped: per sample, ``None`` where the stage removed vision tokens, else why it removed none (e.g.
            ``"no vision tokens"``, ``"merge ratio 0"``, or images too small for the stage's windows).
    """

    layer: int
    vision_before: tuple[int, ...]
    vision_after: tuple[int, ...]
    skipped: tuple[str | None, ...]

    @property
    def ran(self) -> tuple[bool, ...]:
        """Per sample, whether the stage removed any of its vision tokens."""
        return tuple(reason is None for reason in self.skipped)


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
        stages: one :class:`StageReport` per in-prefill stage, in layer order (empty for a post-prefill eviction
            or when no sample had vision tokens).
        images_left_alone: per sample, a note for every image the adapter did not hand to the method and why
            (e.g. its tokens lie under the attention mask); those tokens stay as they are.
    """

    kv_tokens: torch.Tensor
    vision_tokens: torch.Tensor
    original_tokens: torch.Tensor
    original_vision_tokens: torch.Tensor
    reduce_seconds: float
    prefill_seconds: float
    bytes_per_token_layer: int = 0
    stages: tuple[StageReport, ...] = ()
    images_left_alone: tuple[tuple[str, ...], ...] = ()

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
