"""Layer-group KV pools: each group of layers between two reduce layers holds its own KV slots, so a compressed
request holds fewer slots in the later groups.

By default the groups draw pages from one shared arena (:mod:`~lightkv_adapters.sglang.arena`); with
``--kv-compress-pool-ratios`` each group gets a fixed pool instead (:mod:`~lightkv_adapters.sglang.fixed_pools`).
:class:`LayerGroupCache` (SGLang's auxiliary cache of the ``ReqToTokenPool``) holds the slots of groups ``1..`` per
request row, :class:`LayerGroupAllocator` / :class:`ArenaFirstAllocator` are the scheduler's allocator over group 0,
and :func:`install_pools` puts them in place of a model runner's single pool, with the same memory. The scheduler
hooks that drive them are in :mod:`~lightkv_adapters.sglang.admission`; how slots are planned, reserved and freed:
README (SGLang, Memory).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from lightkv_adapters.sglang.arena import ArenaAllocator, ArenaKVPool, PageArena
from lightkv_adapters.sglang.fixed_pools import LayerGroupKVPool, pool_sizes
from lightkv_core.plan import LengthPlan


def layer_groups(reduce_layers: Sequence[int], num_layers: int) -> list[list[int]]:
    """The decoder's layers split after each reduce layer: ``num_reduce + 1`` lists of layer ids."""
    bounds = [0, *(layer + 1 for layer in reduce_layers), num_layers]
    return [list(range(start, end)) for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


class LayerGroupCache:
    """Slots of layer groups ``1..G-1`` per request-pool row: an allocator and a request-to-token table per group.

    Args:
        req_to_token_pool: SGLang's ``ReqToTokenPool`` (its rows and context length size the tables).
        allocators: one allocator per group after the first.
        planner: ``planner(req, seq_len)``: the request's :class:`~lightkv_core.plan.LengthPlan` for a prompt of
            ``seq_len`` tokens.
        full_capacity: slots of group 0 (what SGLang schedules against: ``schedulable_token_capacity``).
        arena: the page arena the groups (group 0 included) draw from; ``None``: each group has a fixed pool.
    """

    def __init__(
        self,
        req_to_token_pool: object,
        allocators: Sequence[TokenToKVPoolAllocator],
        planner: Callable[[object, int], LengthPlan],
        full_capacity: int,
        arena: PageArena | None = None,
    ) -> None:
        rows, width = req_to_token_pool.req_to_token.shape
        device = req_to_token_pool.req_to_token.device
        self.allocators = list(allocators)
        self.planner = planner
        self.dense_capacity = full_capacity
        self.arena = arena
        #: per group after the first: (rows, context) slots of the tokens each row holds in that group
        self.tables = [torch.zeros(rows, width, dtype=torch.int32, device=device) for _ in self.allocators]
        #: (groups - 1, rows) tokens each row holds in each group
        self.lengths = torch.zeros(len(self.allocators), rows, dtype=torch.int64)
        #: (rows,) tokens each row holds in group 0 (0: the row is free)
        self.full_lengths = torch.zeros(rows, dtype=torch.int64)
        self._expected: list = []

    # ---- what SGLang calls ------------------------------------------------------------------------------------

    def expect(self, reqs: Sequence) -> None:
        """The requests of the prefill batch whose rows :meth:`alloc_to_lengths` is about to get, in order."""
        self._expected = list(reqs)

    def alloc_to_lengths(self, *, req_pool_indices_cpu: torch.Tensor, target_seq_lens_cpu: torch.Tensor) -> None:
        """Grow each row to ``target`` tokens in group 0: a new row (prefill) gets its plan's tokens in every
        group, a row that already holds tokens gets one slot per group per new token.

        Raises:
            RuntimeError if a group has too few free slots (nothing is allocated then), or a new row has no
            request to plan from.
        """
        rows = [int(row) for row in req_pool_indices_cpu.tolist()]
        targets = [int(n) for n in target_seq_lens_cpu.tolist()]
        expected, self._expected = self._expected, []
        wanted = self.lengths[:, rows].clone()
        for i, (row, target) in enumerate(zip(rows, targets, strict=True)):
            held = int(self.full_lengths[row])
            if held == 0:
                if len(expected) != len(rows):
                    raise RuntimeError(
                        f"lightkv layer-group pools: row {row} starts a prefill without its request (got "
                        f"{len(expected)} requests for {len(rows)} rows)"
                    )
                plan = self.planner(expected[i], target)
                wanted[:, i] = torch.tensor(plan.lengths[1:], dtype=torch.int64)
            else:
                wanted[:, i] += target - held
        counts = wanted - self.lengths[:, rows]
        allocated = []
        try:
            for group, allocator in enumerate(self.allocators):
                need = int(counts[group].sum())
                slots = allocator.alloc(need) if need > 0 else None
                if need > 0 and slots is None:
                    raise RuntimeError(
                        f"lightkv layer group {group + 1} is out of KV slots: {need} needed, "
                        f"{allocator.available_size()} free (the admission under-reserved)"
                    )
                allocated.append(slots)
        except RuntimeError:
            for group, slots in enumerate(allocated):
                if slots is not None:
                    self.allocators[group].free(slots)
            raise
        for group, slots in enumerate(allocated):
            if slots is None:
                continue
            offset = 0
            for i, row in enumerate(rows):
                start, end = int(self.lengths[group, row]), int(wanted[group, i])
                self.tables[group][row, start:end] = slots[offset : offset + end - start].to(torch.int32)
                offset += end - start
        self.lengths[:, rows] = wanted
        self.full_lengths[rows] = torch.tensor(targets, dtype=torch.int64)

    def free(self, row: int) -> None:
        """Give back every slot ``row`` holds, in every group (SGLang frees the row: finish, abort, retraction)."""
        for group, allocator in enumerate(self.allocators):
            length = int(self.lengths[group, row])
            if length:
                allocator.free(self.tables[group][row, :length].to(torch.int64))
        self.lengths[:, row] = 0
        self.full_lengths[row] = 0

    def clear(self) -> None:
        """Every slot free, every row empty (SGLang clears the pools)."""
        for allocator in self.allocators:
            allocator.clear()
        self.lengths.zero_()
        self.full_lengths.zero_()
        self._expected = []

    def reset_allocator(self) -> None:
        self.clear()

    # ---- what the forward calls ------------------------------------------------------------------------------

    def trim(self, group: int, row: int, length: int) -> None:
        """Row ``row`` holds ``length`` tokens in group ``group`` (``>= 1``) after a reduction: the slots
        reserved past them go back to the group's pool.

        Raises:
            RuntimeError if the reduction kept more tokens than the row holds slots for (a plan that was not an
            upper bound).
        """
        held = int(self.lengths[group - 1, row])
        if length > held:
            raise RuntimeError(
                f"lightkv planned {held} tokens for row {row} in layer group {group} but the reduction kept {length}"
            )
        if length < held:
            self.allocators[group - 1].free(self.tables[group - 1][row, length:held].to(torch.int64))
            self.lengths[group - 1, row] = length

    # ---- admission --------------------------------------------------------------------------------------------

    def fits(self, demand: Sequence[int], reserved: Sequence[int]) -> bool:
        """Whether ``demand[g]`` more slots fit in every group ``g`` (group 0 first) beyond ``reserved[g]``. With
        fixed pools group 0 is SGLang's to check and each later group is checked alone; in an arena the groups
        share the free pages, so all of them are priced together."""
        if self.arena is not None:
            return self.arena.fits(demand, reserved)
        return all(
            need <= free - held for need, free, held in zip(demand[1:], self.available(), reserved[1:], strict=True)
        )

    def refusal(self, prompt: Sequence[int]) -> str | None:
        """Why a request needing ``prompt[g]`` slots in each group (group 0 first) could never be admitted, even
        with every other request gone; ``None`` if it could."""
        if self.arena is not None:
            pages = self.arena.pages_for(prompt)
            if pages <= self.arena.pages - 1:
                return None
            return (
                f"lightkv: the prompt needs {list(prompt)} KV slots in the layer groups, {pages} pages of the shared "
                f"KV arena, which holds {self.arena.pages - 1}; give the server more KV memory "
                "(--mem-fraction-static, --max-total-tokens)"
            )
        sizes = [allocator.size for allocator in self.allocators]
        too_big = [g + 1 for g, (need, size) in enumerate(zip(prompt[1:], sizes, strict=True)) if need > size]
        if not too_big:
            return None
        return (
            f"lightkv: the prompt needs {list(prompt[1:])} KV slots in layer groups 1.. but groups {too_big} hold "
            f"only {sizes}; raise --kv-compress-pool-ratios for them"
        )

    def clip(self, prompt: Sequence[int], max_new: int) -> list[int]:
        """The demand of a request needing ``prompt[g]`` slots per group and ``max_new`` more for its decode, with
        the decode budget clipped to what the empty pools (or arena) hold besides the prompt, as SGLang clips
        generation to its empty pool; decoding past the free slots then retracts (the decode-capacity check asks
        every group)."""
        if self.arena is None:
            sizes = [None, *(allocator.size for allocator in self.allocators)]
            return [
                need + max_new if size is None else min(need + max_new, size)
                for need, size in zip(prompt, sizes, strict=True)
            ]
        decode = self.arena.most_added(prompt, max_new)
        return [need + decode for need in prompt]

    # ---- checks ----------------------------------------------------------------------------------------------

    def available(self) -> list[int]:
        """Free slots of each group after the first (in an arena: shared with the other groups)."""
        return [allocator.available_size() for allocator in self.allocators]

    def state(self) -> list[dict[str, int]]:
        """Per group after the first: its pool's ``size`` and ``free`` slots (what ``/server_info`` reports, see
        :func:`lightkv_adapters.sglang.admission.pool_state_hook`); in an arena both count the whole arena."""
        return [{"size": int(allocator.size), "free": int(allocator.available_size())} for allocator in self.allocators]

    def leaks(self) -> list[str]:
        """One message per group whose slots are not exactly the free ones plus the rows' ones, each once (in an
        arena: the slots of the pages the group holds), and per broken invariant of the arena."""
        problems = []
        for group, allocator in enumerate(self.allocators):
            owned = torch.cat(
                [self.tables[group][row, :length].to(torch.int64) for row, length in enumerate(self.lengths[group])]
                or [torch.zeros(0, dtype=torch.int64)]
            )
            free = torch.cat([allocator.free_pages, allocator.release_pages]).cpu()
            every = torch.cat([owned.cpu(), free])
            if self.arena is None:
                expected = torch.arange(1, allocator.size + 1)
            else:
                expected = self.arena.group_slots(group + 1)
            if every.numel() != expected.numel() or not torch.equal(torch.sort(every).values, expected):
                problems.append(
                    f"lightkv layer group {group + 1}: {owned.numel()} slots held by rows + {free.numel()} free "
                    f"!= {expected.numel()} it holds, or a slot is held twice"
                )
        if self.arena is not None:
            problems += self.arena.leaks()
        return problems


class _DecodeAsksEveryGroup:
    """Mixin of the group-0 allocators: the decode-capacity check asks every group (and the arena) for room."""

    groups: LayerGroupCache | None = None

    def check_decode_capacity(self, *, num_tokens: int, tree_cache, requests=None, spec_algorithm=None) -> bool:
        fits = super().check_decode_capacity(
            num_tokens=num_tokens, tree_cache=tree_cache, requests=requests, spec_algorithm=spec_algorithm
        )
        count = len(self.groups.allocators) + 1
        return fits and self.groups.fits([num_tokens] * count, [0] * count)


class LayerGroupAllocator(_DecodeAsksEveryGroup, TokenToKVPoolAllocator):
    """SGLang's token allocator over group 0 of fixed pools."""


class ArenaFirstAllocator(_DecodeAsksEveryGroup, ArenaAllocator):
    """SGLang's token allocator over group 0 of an arena; generation is clipped to what a request holding a slot
    per token in every group keeps in the empty arena (:meth:`PageArena.text_capacity`)."""

    def max_new_tokens_for_memory(self, input_tokens: int, max_new_tokens: int, *, token_capacity: int, **kwargs):
        capacity = min(token_capacity, self.arena.text_capacity())
        return super().max_new_tokens_for_memory(input_tokens, max_new_tokens, token_capacity=capacity, **kwargs)


def group_demand(groups: LayerGroupCache, req: object, max_new_tokens: int) -> list[int]:
    """Slots a new request needs in each group (group 0 first): its planned prompt tokens, its decode budget
    and one spare slot."""
    seq_len = len(req.full_untruncated_fill_ids)
    plan = groups.planner(req, seq_len)
    return [length + max_new_tokens + 1 for length in plan.lengths]


def arena_allocators(
    arena: PageArena, dtype: torch.dtype, device: str, kvcache: object
) -> tuple[ArenaFirstAllocator, list[ArenaAllocator]]:
    """The allocators of an arena's groups: group 0's (the scheduler's), then one per later group."""
    first = ArenaFirstAllocator(arena, 0, dtype, device, kvcache)
    return first, [ArenaAllocator(arena, group, dtype, device, kvcache) for group in range(1, len(arena.layer_counts))]


def fixed_allocators(
    sizes: Sequence[int], dtype: torch.dtype, device: str, need_sort: bool, kv_pool: LayerGroupKVPool | None = None
) -> tuple[LayerGroupAllocator, list[TokenToKVPoolAllocator]]:
    """The allocators of fixed pools of ``sizes`` slots (group 0 first) over ``kv_pool``'s storage (``None``: slots
    only)."""
    kvcaches = [kv_pool, *(kv_pool.sub_pools[1:] if kv_pool is not None else [None] * (len(sizes) - 1))]
    first = LayerGroupAllocator(sizes[0], dtype, device, kvcaches[0], need_sort)
    later = [
        TokenToKVPoolAllocator(size, dtype, device, kvcache, need_sort)
        for size, kvcache in zip(sizes[1:], kvcaches[1:], strict=True)
    ]
    return first, later


def attach_groups(
    req_to_token_pool: object,
    first: LayerGroupAllocator | ArenaFirstAllocator,
    later: Sequence[TokenToKVPoolAllocator],
    planner: Callable[[object, int], LengthPlan],
    arena: PageArena | None = None,
) -> LayerGroupCache:
    """The :class:`LayerGroupCache` of the later groups' allocators, attached to SGLang's request-to-token pool and
    to group 0's allocator (whose checks ask every group)."""
    cache = LayerGroupCache(req_to_token_pool, later, planner, first.size, arena)
    first.groups = cache
    req_to_token_pool.attach_aux_cache(cache)
    return cache


def install_pools(model_runner: object, ratios: Sequence[float] | None) -> LayerGroupCache | None:
    """Replace ``model_runner``'s single KV pool by layer-group pools of the same memory.

    Args:
        model_runner: SGLang's ``ModelRunner`` right after it allocated its pools (``token_to_kv_pool``,
            ``token_to_kv_pool_allocator``, ``req_to_token_pool``, ``max_total_num_tokens``); its model carries
            ``lightkv_groups`` (a :class:`~lightkv_adapters.sglang.models.grouped.LayerGroups`).
        ratios: fixed pools, with these tokens of each group after the first per token of group 0; ``None``: one
            arena of pages shared by the groups (:mod:`~lightkv_adapters.sglang.arena`).

    Returns:
        The :class:`LayerGroupCache` attached to the request-to-token pool, or ``None`` if the model compresses
        nothing.
    """
    layer_groups_of_model = getattr(model_runner.model, "lightkv_groups", None)
    if layer_groups_of_model is None:
        return None
    stock = model_runner.token_to_kv_pool
    if type(stock) is not MHATokenToKVPool or stock.page_size != 1 or stock.kv_cache_layout != "nhd":
        raise NotImplementedError(
            f"lightkv layer-group pools replace SGLang's MHATokenToKVPool with page size 1 and the NHD layout, not "
            f"{type(stock).__name__} with page size {stock.page_size} and layout {stock.kv_cache_layout}"
        )
    groups = layer_groups(layer_groups_of_model.method.reduce_layers, stock.layer_num)
    counts = [len(layers) for layers in groups]
    settings = dict(dtype=stock.dtype, head_num=stock.head_num, head_dim=stock.head_dim, v_head_dim=stock.v_head_dim)
    device, need_sort, tokens = stock.device, model_runner.token_to_kv_pool_allocator.need_sort, stock.size
    model_runner.token_to_kv_pool = model_runner.token_to_kv_pool_allocator = stock = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    dtype = settings["dtype"]
    if ratios is None:
        arena = PageArena.for_memory(tokens, counts, device)
        kv_pool = ArenaKVPool(arena, device=device, **settings)
        allocator, allocators = arena_allocators(arena, dtype, device, kv_pool)
    else:
        arena = None
        sizes = pool_sizes(tokens, counts, ratios)
        kv_pool = LayerGroupKVPool(sizes, groups, device=device, **settings)
        allocator, allocators = fixed_allocators(sizes, dtype, device, need_sort, kv_pool)
    cache = attach_groups(
        model_runner.req_to_token_pool, allocator, allocators, layer_groups_of_model.plan_request, arena
    )
    model_runner.token_to_kv_pool = kv_pool
    model_runner.token_to_kv_pool_allocator = allocator
    model_runner.max_total_num_tokens = allocator.size
    if getattr(model_runner, "memory_pool_config", None) is not None:
        model_runner.memory_pool_config.max_total_num_tokens = allocator.size
    layer_groups_of_model.pools = cache
    return cache
