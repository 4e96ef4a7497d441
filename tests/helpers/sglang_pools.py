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
from lightkv_adapters.sglang.pools import (  # noqa: E402
    ArenaFirstAllocator,
    LayerGroupAllocator,
    LayerGroupCache,
    arena_allocators,
    attach_groups,
    fixed_allocators,
)
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
    allocator, later = fixed_allocators(sizes, DTYPE, "cpu", need_sort)
    return pool, allocator, attach_groups(pool, allocator, later, planner)


def build_arena(
    arena: PageArena, planner: Callable[[object, int], LengthPlan]
) -> tuple[ReqToTokenPool, ArenaFirstAllocator, LayerGroupCache]:
    """:func:`build_pools` for layer groups drawing from ``arena``."""
    pool = ReqToTokenPool(size=ROWS, max_context_len=CONTEXT, device="cpu", enable_memory_saver=False)
    allocator, later = arena_allocators(arena, DTYPE, "cpu", None)
    return pool, allocator, attach_groups(pool, allocator, later, planner, arena)


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
