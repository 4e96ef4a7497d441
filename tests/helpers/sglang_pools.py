"""Layer-group KV pools on SGLang's real classes (CPU), wired up as ``install_pools`` wires them but without K/V
storage, for the pool tests (``tests/adapters/test_sglang_pools_*.py``).

Imports SGLang: import it only from modules that skip where SGLang is not installed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lightkv_adapters.sglang import cpu_env

cpu_env.install()

from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool  # noqa: E402

from lightkv_adapters.sglang.arena import ArenaAllocator, PageArena  # noqa: E402
from lightkv_adapters.sglang.pools import ArenaFirstAllocator, LayerGroupAllocator, LayerGroupCache  # noqa: E402
from lightkv_core.plan import LengthPlan  # noqa: E402

#: Decoder depth of the state machine's model.
NUM_LAYERS = 8
#: Request-pool rows and context length of the ``ReqToTokenPool`` that :func:`build_pools` makes.
ROWS, CONTEXT = 6, 4096
DTYPE = torch.float16


def build_pools(
    sizes: Sequence[int], planner: Callable[[object, int], LengthPlan], need_sort: bool = False
) -> tuple[ReqToTokenPool, LayerGroupAllocator, LayerGroupCache]:
    """What ``install_pools`` wires up, without K/V storage: SGLang's request-to-token pool, the group-0
    allocator and the cache of groups ``1..`` attached to the pool (``sizes``: slots per group, group 0 first)."""
    pool = ReqToTokenPool(size=ROWS, max_context_len=CONTEXT, device="cpu", enable_memory_saver=False)
    allocator = LayerGroupAllocator(sizes[0], DTYPE, "cpu", None, need_sort)
    later = [TokenToKVPoolAllocator(size, DTYPE, "cpu", None, need_sort) for size in sizes[1:]]
    cache = LayerGroupCache(pool, later, planner, sizes[0])
    pool.attach_aux_cache(cache)
    allocator.groups = cache
    return pool, allocator, cache


def build_arena(
    pages: int, layer_counts: Sequence[int], rows_per_page: int, planner: Callable[[object, int], LengthPlan]
) -> tuple[ReqToTokenPool, ArenaFirstAllocator, LayerGroupCache]:
    """:func:`build_pools` for groups of ``layer_counts`` layers drawing from one arena of ``pages`` pages."""
    pool = ReqToTokenPool(size=ROWS, max_context_len=CONTEXT, device="cpu", enable_memory_saver=False)
    arena = PageArena(pages, layer_counts, rows_per_page)
    allocator = ArenaFirstAllocator(arena, 0, DTYPE, "cpu", None)
    later = [ArenaAllocator(arena, group, DTYPE, "cpu", None) for group in range(1, len(layer_counts))]
    cache = LayerGroupCache(pool, later, planner, allocator.size, arena)
    pool.attach_aux_cache(cache)
    allocator.groups = cache
    return pool, allocator, cache


def halving_planner(req: object, seq_len: int) -> LengthPlan:
    """Two later groups holding half and a quarter of the prompt."""
    return LengthPlan.exactly((seq_len, seq_len // 2, seq_len // 4))


def assert_conserved(allocator: TokenToKVPoolAllocator, owned: Sequence[torch.Tensor]) -> None:
    """Every slot of ``allocator`` is either free or held by exactly one of the ``owned`` rows (in an arena: every
    slot of the pages its group holds, and every page of the arena free or held by one group)."""
    held = torch.cat([slots.to(torch.int64) for slots in owned] or [torch.zeros(0, dtype=torch.int64)])
    free = torch.cat([allocator.free_pages, allocator.release_pages])
    every = torch.sort(torch.cat([held, free])).values
    if isinstance(allocator, ArenaAllocator):
        arena = allocator.arena
        assert allocator.available_size() == free.numel() + arena.free_page_count() * allocator.tokens_per_page
        assert torch.equal(every, arena.group_slots(allocator.group)), "a slot is held twice, or held and free"
        assert arena.leaks() == []
        return
    assert free.numel() == allocator.available_size()
    assert held.numel() + free.numel() == allocator.size
    assert torch.equal(every, torch.arange(1, allocator.size + 1)), "a slot is held twice, or held and free"
