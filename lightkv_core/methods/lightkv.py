"""LightKV as a :class:`PrefillReduction`: one :func:`lightkv_stage` per scheduled layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightkv_core.compaction import StageResult
from lightkv_core.config import LightKVConfig
from lightkv_core.kernels.launch import check_backend
from lightkv_core.methods.base import PrefillReduction
from lightkv_core.plan import LengthPlan, plan_lengths
from lightkv_core.shards import HeadShards
from lightkv_core.spans import VisionSpan
from lightkv_core.stage import lightkv_stage
from lightkv_core.windows import min_mergeable_tokens


@dataclass(frozen=True)
class LightKV(PrefillReduction):
    """LightKV with a schedule ``config``; ``backend`` picks the kernels (``"auto"``, ``"triton"``, ``"torch"``).

    ``LightKV(config.replace(guide="none"))`` is the unguided ablation (uniform merge weights, i.e.
    windowed bipartite averaging).
    """

    config: LightKVConfig
    backend: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.config, LightKVConfig):
            raise TypeError(f"{type(self).__name__}: config must be a LightKVConfig, got {type(self.config).__name__}")
        check_backend(type(self).__name__, self.backend)

    @property
    def position_mode(self) -> str:
        return self.config.position_mode

    @property
    def reduce_layers(self) -> tuple[int, ...]:
        return self.config.merge_layers

    def plan_lengths(self, spans: Sequence, seq_len: int) -> LengthPlan:
        return plan_lengths(spans, self.config, seq_len)

    def skip_reason(self, layer: int, spans: Sequence[VisionSpan]) -> str:
        """Names the rule that left the sample's images unmerged: no images, ratio 0, or every image smaller
        than the ``8 W^2`` mergeable tokens a stage of ``W x W`` windows needs."""
        stage = self.config.stage_at(layer)
        if not spans or stage is None:
            return super().skip_reason(layer, spans)
        window, ratio = stage
        if ratio == 0.0:
            return f"merge ratio 0 at layer {layer}"
        counts = [span.num_mergeable() for span in spans]
        needed = min_mergeable_tokens(window)
        if all(count < needed for count in counts):
            return (
                f"images of {', '.join(map(str, counts))} mergeable tokens: a stage of {window}x{window} windows "
                f"needs {needed} per image"
            )
        if self.config.layout == "reference" and any(count < needed for count in counts):
            return f"layout='reference' skips a sample with an image under {needed} mergeable tokens (W={window})"
        return f"ratio {ratio} merges no token in any window of these images"

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
        stage = self.config.stage_at(layer)
        if stage is None:
            raise ValueError(f"layer {layer} is not in merge_layers {self.config.merge_layers}")
        window, ratio = stage
        return lightkv_stage(
            hidden,
            q,
            k,
            spans,
            window,
            ratio,
            guide=self.config.guide,
            layout=self.config.layout,
            positions=self.config.position_mode,
            position_ids=position_ids,
            attention_mask=attention_mask,
            padding_side=padding_side,
            backend=self.backend,
            head_shards=head_shards,
        )
