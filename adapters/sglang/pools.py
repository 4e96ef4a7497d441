"""Layer-group KV pools: each group of layers between two reduce layers holds its own KV slots, so a compressed
request holds fewer slots in the later groups.

By default the groups draw pages from one shared arena (:mod:`~lightkv_adapters.sglang.arena`); with
``--kv-compress-pool-ratios`` each group gets a fixed pool instead (:mod:`~lightkv_adapters.sglang.fixed_pools`).
:class:`~lightkv_adapters.sglang.group_cache.LayerGroupCache` (SGLang's auxiliary cache of the ``ReqToTokenPool``)
holds the slots of groups ``1..`` per request row, :class:`LayerGroupAllocator` / :class:`ArenaFirstAllocator` are
the scheduler's allocator over group 0, and :func:`install_pools` puts them in place of a model runner's single
pool, with the same memory. The scheduler hooks that drive them are in :mod:`~lightkv_adapters.sglang.admission`;
how slots are planned, reserved and freed: README (SGLang, Memory).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from lightkv_adapters.sglang.arena import ArenaAllocator, ArenaKVPool, PageArena
from lightkv_adapters.sglang.fixed_pools import LayerGroupKVPool, pool_sizes
from lightkv_adapters.sglang.group_cache import LayerGroupCache
from lightkv_core.plan import LengthPlan


def layer_groups(reduce_layers: Sequence[int], num_layers: int) -> list[list[int]]:
    """The decoder's layers split after each reduce layer: ``num_reduce + 1`` lists of layer ids."""
    bounds = [0, *(layer + 1 for layer in reduce_layers), num_layers]
    return [list(range(start, end)) for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


class _FirstGroupAllocator:
    """Mixin of the group-0 allocators: freeing group-0 slots frees their later-group partners (shared rows, and
    the radix tree's text-only prefixes), and the decode-capacity check asks every group (and the arena) for room,
    evicting from the radix tree as SGLang does for group 0."""

    groups: LayerGroupCache | None = None

    def free(self, free_index: torch.Tensor) -> None:
        if self.groups is not None and self.free_group is None and free_index.numel():
            self.groups.release_partners(free_index)
        super().free(free_index)

    def check_decode_capacity(self, *, num_tokens, tree_cache, requests=None, spec_algorithm=None) -> bool:
        fits = super().check_decode_capacity(
            num_tokens=num_tokens, tree_cache=tree_cache, requests=requests, spec_algorithm=spec_algorithm
        )
        count = len(self.groups.allocators) + 1
        return fits and self.groups.make_room([num_tokens] * count, [0] * count, tree_cache)


class LayerGroupAllocator(_FirstGroupAllocator, TokenToKVPoolAllocator):
    """SGLang's token allocator over group 0 of fixed pools."""


class ArenaFirstAllocator(_FirstGroupAllocator, ArenaAllocator):
    """SGLang's token allocator over group 0 of an arena; generation is clipped to what a request holding a slot
    per token in every group keeps in the empty arena (:meth:`PageArena.text_capacity`)."""

    def max_new_tokens_for_memory(self, input_tokens: int, max_new_tokens: int, *, token_capacity: int, **kwargs):
        capacity = min(token_capacity, self.arena.text_capacity())
        return super().max_new_tokens_for_memory(input_tokens, max_new_tokens, token_capacity=capacity, **kwargs)


def group_demand(groups: LayerGroupCache, req: object, max_new_tokens: int) -> list[int]:
    """Slots a new request needs in each group (group 0 first): its planned prompt tokens, its decode budget
    and one spare slot. A prompt whose plan keeps every token needs none for the prefix it matched in SGLang's
    radix tree (``req.prefix_len``: the prefix's slots, and their partners in every group, are the tree's)."""
    seq_len = len(req.full_untruncated_fill_ids)
    plan = groups.planner(req, seq_len)
    prefix = getattr(req, "prefix_len", 0) if plan.keeps_every_token else 0
    return [length - prefix + max_new_tokens + 1 for length in plan.lengths]


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
