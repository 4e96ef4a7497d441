"""The pieces of the layer-group pools' state machine (tests/adapters/test_sglang_pools_machine.py): the methods it
plans with, its requests, what it expects a running request to hold, and a radix tree of finished text-only
requests. Imports SGLang: import it only from modules that skip where SGLang is not installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from helpers.sglang_pools import NUM_LAYERS
from lightkv_core.config import PRESET_DEPTHS, LightKVConfig
from lightkv_core.methods import FastV, LightKV, PrefillReduction
from lightkv_core.plan import LengthPlan
from lightkv_core.spans import VisionSpan
from lightkv_perf.capacity_requests import FakeReq

#: Methods the state machine plans with: LightKV schedules scaled to ``NUM_LAYERS`` (LLaVA's windows nest, so
#: its plans are mostly exact; Qwen2.5-VL's 6-4-2 windows do not, so many of its plans are only bounds) and FastV.
METHODS: dict[str, PrefillReduction] = {
    "lightkv-llava": LightKV(LightKVConfig.preset("llava-1.5").scaled_to(NUM_LAYERS, PRESET_DEPTHS["llava-1.5"])),
    "lightkv-qwen": LightKV(LightKVConfig.preset("qwen2.5-vl").scaled_to(NUM_LAYERS, PRESET_DEPTHS["qwen2.5-vl"])),
    "fastv": FastV(2, 0.5),
}
#: Most tokens a state-machine request decodes.
MAX_NEW = 128


@dataclass(eq=False)
class Running:
    """A request holding a row, as the test expects the pools to hold it."""

    req: FakeReq
    row: int
    plan: LengthPlan
    #: tokens (slots) in group 0
    seq_len: int
    #: group-0 slots, from ``ReqToTokenPool.req_to_token``
    full_slots: torch.Tensor
    #: tokens each later group holds
    held: list[int]
    #: slots each later group holds, from the cache's tables
    group_slots: list[torch.Tensor]
    generated: int = 0
    reduced: bool = False
    #: leading tokens whose slots (and their partners) are the radix tree entry's ``cached``
    prefix: int = 0
    cached: Cached | None = None

    @property
    def shared(self) -> bool:
        """Whether the plan keeps every token (a text-only prompt): the later groups' slots partner group 0's."""
        return self.plan.keeps_every_token

    @property
    def remaining(self) -> int:
        """Tokens the request may still decode."""
        return self.req.max_new_tokens - self.generated


@dataclass(eq=False)
class Cached:
    """A finished text-only request kept by the radix tree: its group-0 slots and (to compare reuses with) the
    later groups' slots its row had."""

    slots: torch.Tensor
    group_slots: list[torch.Tensor]
    locks: int = 0


@dataclass(eq=False)
class Tree:
    """The parts of SGLang's radix tree the pools use: what is evictable and evicting it (oldest first), which
    frees the group-0 slots (and so their partners) through the allocator."""

    allocator: object
    entries: list[Cached] = field(default_factory=list)

    def supports_prefix_sharing(self) -> bool:
        return True

    def evictable_size(self) -> int:
        return sum(entry.slots.numel() for entry in self.entries if not entry.locks)

    def evict(self, params: object) -> object:
        from sglang.srt.mem_cache.base_prefix_cache import EvictResult

        evicted = 0
        for entry in [entry for entry in self.entries if not entry.locks]:
            if evicted >= params.num_tokens:
                break
            self.drop(entry)
            evicted += entry.slots.numel()
        return EvictResult(num_tokens_evicted=evicted)

    def drop(self, entry: Cached) -> None:
        self.allocator.free(entry.slots)
        self.entries.remove(entry)


@st.composite
def requests(draw: st.DrawFn) -> FakeReq:
    """A prompt of up to two images of 8..24 tokens per side, with text before, between and after them."""
    position = draw(st.integers(0, 20))
    spans = []
    for _ in range(draw(st.integers(0, 2))):
        rows, cols = draw(st.integers(8, 24)), draw(st.integers(8, 24))
        spans.append(VisionSpan(position, position + rows * cols, rows, cols))
        position += rows * cols + draw(st.integers(0, 10))
    seq_len = position + draw(st.integers(1, 40))
    return FakeReq(spans, range(seq_len), draw(st.integers(1, MAX_NEW)))


def planner_of(method: PrefillReduction) -> Callable[[FakeReq, int], LengthPlan]:
    """The cache's planner for ``method``: the request's spans in a prompt of ``seq_len`` tokens."""

    def plan(req: FakeReq, seq_len: int) -> LengthPlan:
        return method.plan_lengths(req.spans, seq_len)

    return plan
