"""The slot simulation behind the capacity benchmark (:mod:`lightkv_perf.capacity`): SGLang's real request pool and
allocators with the plugin's layer-group pools, driven as SGLang's scheduler drives them (admission with decode
budgets reserved, prefill allocation, the forward's trims, decode, finish), with nothing computed.

Import after :func:`lightkv_adapters.sglang.cpu_env.install` (it imports SGLang).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

from lightkv_adapters.sglang.arena import PageArena
from lightkv_adapters.sglang.fixed_pools import pool_sizes
from lightkv_adapters.sglang.pools import (
    LayerGroupCache,
    arena_allocators,
    attach_groups,
    fixed_allocators,
    group_demand,
    layer_groups,
)
from lightkv_core.methods import PrefillReduction
from lightkv_core.plan import LengthPlan
from lightkv_core.spans import VisionSpan
from lightkv_perf.capacity_requests import FakeReq, llava_next_request, text_request

#: How the slots are held: one pool (stock SGLang), fixed pools per layer group, one arena of pages shared by the
#: groups (the plugin's default).
LAYOUTS = ("one", "static", "shared")

#: The request the former default fixed-pool ratios were derived from: LLaVA-NeXT's five 24x24 grids and 100 text
#: tokens, and the slots it keeps for 128 decoded tokens (one per group each).
RATIO_IMAGES, RATIO_GRID, RATIO_TEXT, RATIO_DECODE = 5, 24, 100, 128


def static_default_ratios(method: PrefillReduction) -> tuple[float, ...]:
    """The fixed-pool ratios the plugin used by default before the shared arena: slots of group ``g >= 1`` per slot
    of group 0 that a LLaVA-NeXT-like request holds (its plan's upper bound), plus 128 decoded tokens."""
    grid = RATIO_GRID * RATIO_GRID
    spans = [VisionSpan(i * grid, (i + 1) * grid, RATIO_GRID, RATIO_GRID) for i in range(RATIO_IMAGES)]
    plan = method.plan_lengths(spans, RATIO_IMAGES * grid + RATIO_TEXT)
    held = [length + RATIO_DECODE for length in plan.lengths]
    return tuple(length / held[0] for length in held[1:])


@dataclass(eq=False)
class Held:
    """A request holding a row: its kind, row, tokens in group 0, tokens decoded and leading tokens whose slots are
    the radix tree's."""

    kind: str
    row: int
    seq_len: int
    generated: int = 0
    prefix: int = 0


class SlotSim:
    """The slots of one KV memory budget held one way (:data:`LAYOUTS`).

    Args:
        layout: ``"one"``, ``"static"`` or ``"shared"``.
        stock_tokens: slots of the stock single pool (in every layer): the memory budget.
        method: the compression method (its plan sizes the later groups).
        num_layers: decoder depth.
        static_ratios: the fixed pools' ratios (``"static"`` only).
        cached_prefix: with SGLang's radix cache on, the tokens of a system prompt every request starts with, cached
            once (0: no radix cache). One pool reuses it for every request, as stock SGLang does; the layer groups
            for text-only requests only (README, SGLang: the radix cache), holding it in every group.
    """

    def __init__(
        self,
        layout: str,
        stock_tokens: int,
        method: PrefillReduction,
        num_layers: int,
        static_ratios: Sequence[float],
        rows: int = 512,
        context: int = 8192,
        cached_prefix: int = 0,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.method = method
        self._plans: dict[tuple[str, int], LengthPlan] = {}
        counts = [len(layers) for layers in layer_groups(method.reduce_layers, num_layers)]
        self.req_pool = ReqToTokenPool(rows, context, "cpu", enable_memory_saver=False)
        self.cache: LayerGroupCache | None = None
        self.arena: PageArena | None = None
        dtype = torch.float16
        self.cached_prefix = cached_prefix
        #: the cached system prompt's group-0 slots, held by the radix tree (``None``: nothing cached)
        self.prefix_slots: torch.Tensor | None = None
        if layout == "one":
            self.sizes = [stock_tokens]
            self.allocator = TokenToKVPoolAllocator(stock_tokens, dtype, "cpu", None, False)
            if cached_prefix:
                self.prefix_slots = self.allocator.alloc(cached_prefix)
            return
        if layout == "static":
            self.allocator, later = fixed_allocators(
                pool_sizes(stock_tokens, counts, static_ratios), dtype, "cpu", False
            )
        else:
            self.arena = PageArena.for_memory(stock_tokens, counts)
            self.allocator, later = arena_allocators(self.arena, dtype, "cpu", None)
        self.sizes = [allocator.size for allocator in (self.allocator, *later)]
        self.cache = attach_groups(self.req_pool, self.allocator, later, self._plan, self.arena)
        # the tree keeps a finished text-only request's group-0 slots, and with them their partners in every group
        if cached_prefix:
            system = self.admit(FakeReq((), range(cached_prefix), kind="system prompt"))
            self.prefix_slots = self.req_pool.req_to_token[system.row, :cached_prefix].long()
            self.req_pool.free_rows([system.row])

    def _matched(self, req: FakeReq) -> FakeReq:
        """``req`` with the prefix it matches in the radix tree: the cached system prompt, for every request in one
        pool and for text-only ones with layer groups (prompts with images stay out of the tree)."""
        matches = self.cached_prefix and (self.cache is None or not req.spans)
        return replace(req, prefix_len=self.cached_prefix if matches else 0)

    def _plan(self, req: FakeReq, seq_len: int) -> LengthPlan:
        """``method.plan_lengths(req.spans, seq_len)``, once per request kind and length (it is deterministic)."""
        key = (req.kind, seq_len)
        if key not in self._plans:
            self._plans[key] = self.method.plan_lengths(req.spans, seq_len)
        return self._plans[key]

    def fits(self, req: FakeReq, max_new: int, reserved: int) -> bool:
        """SGLang's admission check of group 0 and, with layer groups, the plugin's (``admission_hook``): the
        prompt, ``max_new`` decode slots and a spare beyond ``reserved`` decode slots of the running requests."""
        req = self._matched(req)
        seq_len = len(req.full_untruncated_fill_ids) - req.prefix_len
        if seq_len + max_new + 1 > self.allocator.available_size() - reserved:
            return False
        if self.cache is None:
            return True
        demand = self.cache.clip(group_demand(self.cache, req, 0), max_new)
        return self.cache.fits(demand, [reserved] * len(demand))

    def admit(self, req: FakeReq) -> Held:
        """Allocate ``req``'s prefill as SGLang does (row, group-0 slots, the later groups' planned slots) and the
        forward's trims (the plan is exact for these requests); a matched prefix takes the tree's slots."""
        prefix = self._matched(req).prefix_len if self.prefix_slots is not None else 0
        seq_len = len(req.full_untruncated_fill_ids)
        (row,) = self.req_pool.alloc_rows(1)
        slots = self.allocator.alloc(seq_len - prefix)
        if slots is None:
            raise RuntimeError("group 0 ran out of slots for an admitted prefill")
        if prefix:
            slots = torch.cat([self.prefix_slots[:prefix], slots])
        self.req_pool.write((row, slice(0, seq_len)), slots.to(torch.int32))
        if self.cache is not None:
            self.cache.expect([req])
            self.req_pool.alloc_aux_to_lengths(
                req_pool_indices_cpu=torch.tensor([row]), target_seq_lens_cpu=torch.tensor([seq_len])
            )
            plan = self._plan(req, seq_len)
            for group in range(1, len(plan.lengths)):
                self.cache.trim(group, row, plan.lengths[group])
        return Held(req.kind, row, seq_len, prefix=prefix)

    def decode(self, held: Sequence[Held]) -> None:
        """One decode step: a slot per group for every request in ``held``.

        Raises:
            RuntimeError if a group runs out (the admission under-reserved).
        """
        if not held:
            return
        rows = torch.tensor([request.row for request in held], dtype=torch.int64)
        lens = torch.tensor([request.seq_len + request.generated for request in held], dtype=torch.int64)
        slots = self.allocator.alloc(len(held))
        if slots is None:
            raise RuntimeError("group 0 ran out of slots during decode: the admission under-reserved")
        self.req_pool.write((rows, lens), slots.to(torch.int32))
        if self.cache is not None:
            self.req_pool.alloc_aux_to_lengths(req_pool_indices_cpu=rows, target_seq_lens_cpu=lens + 1)
        for request in held:
            request.generated += 1

    def finish(self, held: Sequence[Held]) -> None:
        """The requests finish: group 0's slots go back in one call, each row (and its later-group slots) as
        SGLang frees it."""
        if not held:
            return
        self.allocator.free(
            torch.cat([self.req_pool.req_to_token[r.row, r.prefix : r.seq_len + r.generated] for r in held]).long()
        )
        self.req_pool.free_rows([request.row for request in held])

    def free(self) -> list[int]:
        """Free slots of each group (in an arena: what each group could take, shared)."""
        return [self.allocator.available_size(), *([] if self.cache is None else self.cache.available())]

    def check_empty(self) -> None:
        """Evicts the cached prefix; raises ``RuntimeError`` unless every slot (and page) is then free again and
        nothing leaked."""
        if self.prefix_slots is not None:
            self.allocator.free(self.prefix_slots)
            self.prefix_slots = None
        problems = [] if self.cache is None else self.cache.leaks()
        if problems or self.free() != self.sizes:
            raise RuntimeError(f"slots leaked after freeing every request: {problems or self.free()}")


def fill(sim: SlotSim, cycle: Sequence[FakeReq], max_new: int, verify: bool = True) -> dict:
    """Admit requests of the repeating ``cycle`` until one does not fit; with ``verify``, then decode them all to
    ``max_new`` tokens, free them and check the pools."""
    held: list[Held] = []
    by_kind = dict.fromkeys(sorted({req.kind for req in cycle}), 0)
    stream: Iterator[FakeReq] = itertools.cycle(cycle)
    while True:
        req = next(stream)
        if not sim.fits(req, max_new, max_new * len(held)):
            refused = req.kind
            break
        held.append(sim.admit(req))
        by_kind[req.kind] += 1
    result = {
        "requests": len(held),
        "by_kind": by_kind,
        "refused": refused,
        "pool_slots": sim.sizes,
        "free_after_admission": sim.free(),
    }
    if sim.arena is not None:
        result["pages"] = sim.arena.pages - 1
        result["free_pages_after_admission"] = sim.arena.free_page_count()
    if not verify:
        return result
    for _ in range(max_new):
        sim.decode(held)
    sim.finish(held)
    sim.check_empty()
    return {**result, "decode_verified": True}


def shifting_trace(requests: int) -> list[FakeReq]:
    """``requests`` arrivals whose share of LLaVA-NeXT-like requests falls linearly from 1 to 0; the rest are
    text-only (deterministic)."""
    trace, share = [], 0.0
    for index in range(requests):
        share += 1.0 - index / (requests - 1)
        if share >= 1.0:
            share -= 1.0
            trace.append(llava_next_request())
        else:
            trace.append(text_request())
    return trace


def serve(sim: SlotSim, trace: Sequence[FakeReq], max_new: int) -> dict:
    """Serve ``trace``, all queued at once, in decode steps: each step admits queued requests in order while they
    fit (each reserving ``max_new`` decode slots), then every running request decodes a token; a request finishes
    after ``max_new`` tokens. Returns the requests held at each step, their mean while requests wait, and the steps
    taken; the pools are checked empty at the end."""
    queue, running, held_per_step, waiting_steps = deque(trace), [], [], []
    while queue or running:
        while queue and sim.fits(queue[0], max_new, sum(max_new - r.generated for r in running)):
            running.append(sim.admit(queue.popleft()))
        if not running:
            raise RuntimeError(f"a {queue[0].kind} request does not fit the empty pools")
        held_per_step.append(len(running))
        if queue:
            waiting_steps.append(len(running))
        sim.decode(running)
        done = [request for request in running if request.generated >= max_new]
        sim.finish(done)
        running = [request for request in running if request.generated < max_new]
    sim.check_empty()
    return {
        "steps": len(held_per_step),
        "mean_held": round(sum(waiting_steps) / max(len(waiting_steps), 1), 2),
        "held_per_step": held_per_step,
    }
