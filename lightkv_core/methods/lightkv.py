"""LightKV as a :class:`PrefillReduction`: one :func:`lightkv_stage` per scheduled layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightkv_core.compaction import StageResult
from lightkv_core.config import LightKVConfig
from lightkv_core.methods.base import PrefillReduction
from lightkv_core.plan import LengthPlan, plan_lengths
from lightkv_core.stage import lightkv_stage


@dataclass(frozen=True)
class LightKV(PrefillReduction):
    """LightKV with a schedule ``config``; ``backend`` picks the kernels (``"auto"``, ``"triton"``, ``"torch"``).

    ``LightKV(config.replace(guide="none"))`` is the unguided ablation (uniform merge weights, i.e.
    windowed bipartite averaging).
    """

    config: LightKVConfig
    backend: str = "auto"

    @property
    def position_mode(self) -> str:
        return self.config.position_mode

    @property
    def reduce_layers(self) -> tuple[int, ...]:
        return self.config.merge_layers

    def plan_lengths(self, spans: Sequence, seq_len: int) -> LengthPlan:
        return plan_lengths(spans, self.config, seq_len)

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
        )
