"""Methods that drive another method through the transformers adapter, for its tests: :class:`Wrapping` (same
layers and positions) and :class:`Replay`, the no-cache reference for decoding (the first forward's merges replayed
on every longer forward of the same prompt)."""

from __future__ import annotations

import torch

from lightkv_core import StageResult
from lightkv_core.methods import PrefillReduction
from lightkv_core.plan import LengthPlan


class Wrapping(PrefillReduction):
    """A method that drives another one (``method``): same layers, same positions."""

    def __init__(self, method: PrefillReduction) -> None:
        self.method = method

    @property
    def reduce_layers(self) -> tuple[int, ...]:
        return self.method.reduce_layers

    @property
    def position_mode(self) -> str:
        return self.method.position_mode

    def plan_lengths(self, spans, seq_len: int) -> LengthPlan:
        return self.method.plan_lengths(spans, seq_len)

    def skip_reason(self, layer: int, spans) -> str:
        return self.method.skip_reason(layer, spans)


class Replay(Wrapping):
    """Runs ``method`` on the first forward, then replays the same merges (same pairs, same weights) on a
    longer sequence whose extra tokens are appended at the end: the no-cache reference for decoding."""

    def __init__(self, method: PrefillReduction) -> None:
        super().__init__(method)
        self.recorded: dict[int, tuple[int, StageResult]] = {}

    def reduce(self, layer, hidden, q, k, spans, **kwargs) -> StageResult:
        if layer not in self.recorded:
            result = self.method.reduce(layer, hidden, q, k, spans, **kwargs)
            self.recorded[layer] = (hidden.shape[1], result)
            return result
        length, result = self.recorded[layer]
        extra = hidden.shape[1] - length
        merged = torch.zeros_like(result.hidden, dtype=torch.float64)
        weight = torch.zeros(result.hidden.shape[:2], dtype=torch.float64)
        scores = result.scores.double() if result.scores is not None else torch.ones(hidden.shape[0], length)
        for b in range(hidden.shape[0]):
            for slot, index in enumerate(result.kept_padded[b].tolist()):
                if index < 0:
                    continue
                sources = [index, *(result.merged_into[b] == index).nonzero().squeeze(1).tolist()]
                for source in sources:
                    merged[b, slot] += scores[b, source] * hidden[b, source].double()
                    weight[b, slot] += scores[b, source]
        merged = merged / weight.clamp(min=1e-8)[..., None]
        appended = torch.arange(length, length + extra).expand(hidden.shape[0], -1)
        return StageResult(
            hidden=torch.cat([merged.to(hidden.dtype), hidden[:, length:]], dim=1),
            positions=torch.cat([result.positions, kwargs["position_ids"][:, length:]], dim=1),
            lengths=result.lengths + extra,
            kept_padded=torch.cat([result.kept_padded, appended], dim=1),
            kept=result.kept,
            spans=result.spans,
            merged_into=result.merged_into,
            scores=result.scores,
        )
