"""The shared arena of KV pages (``lightkv_adapters.sglang.arena``) on SGLang's real classes (CPU): page sizes,
the K/V storage's per-layer views (every layer of every group writes where only it reads), pages moving between
groups as slots are taken and given back, and a failed prefill allocation leaving the arena as it was.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if importlib.util.find_spec("sglang") is None:
    pytest.skip("SGLang is not installed", allow_module_level=True)

from lightkv_adapters.sglang import cpu_env  # noqa: E402

cpu_env.install()

from helpers.sglang_pools import build_arena, halving_planner  # noqa: E402

from lightkv_adapters.sglang.arena import ArenaAllocator, ArenaKVPool, PageArena, page_rows  # noqa: E402


@given(st.lists(st.integers(1, 40), min_size=1, max_size=6))
def test_page_rows_divide_evenly_among_the_groups(counts: list[int]) -> None:
    """A page leaves no row over in any group and gives every group at least 16 tokens, and no smaller multiple of
    the layer counts' least common multiple would."""
    rows = page_rows(counts)
    assert all(rows % count == 0 for count in counts)
    assert min(rows // count for count in counts) >= 16
    assert rows == math.lcm(*counts) or min((rows - math.lcm(*counts)) // count for count in counts) < 16


def test_page_zero_is_never_handed_out_and_pages_need_room() -> None:
    arena = PageArena(3, [2, 1], 4)
    assert arena.take(0, 2).tolist() == [1, 2]
    assert arena.take(1, 1) is None
    with pytest.raises(ValueError, match="at least 2 pages"):
        PageArena(1, [2, 1], 4)
    with pytest.raises(ValueError, match="cannot hold one token of 5 layers"):
        PageArena(4, [5, 1], 4)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_every_layer_reads_back_what_it_wrote(data: st.DataObject) -> None:
    """Groups of 3, 1 and 2 layers on 6-row pages: each group takes random slots, every layer writes a value
    naming (layer, slot) through SGLang's ``set_kv_buffer``, and every layer then reads its own values back at its
    slots through ``get_key_buffer`` / ``get_value_buffer``: no layer or group overwrote another's rows."""
    counts = [3, 1, 2]
    arena = PageArena(9, counts, 6)
    pool = ArenaKVPool(arena, torch.float32, head_num=1, head_dim=2, v_head_dim=1, device="cpu")
    allocators = [ArenaAllocator(arena, group, torch.float32, "cpu", pool) for group in range(3)]
    slots = []
    for allocator in allocators:
        need = data.draw(st.integers(0, 6))
        taken = allocator.alloc(need)
        slots.append(taken if taken is not None else torch.zeros(0, dtype=torch.int64))
    layers = [(group, layer) for group, count in enumerate(counts) for layer in range(count)]
    for layer_id, (group, _) in enumerate(layers):
        loc = slots[group]
        value = (layer_id * 1000 + loc).to(torch.float32)
        layer = type("Layer", (), {"layer_id": layer_id})()
        pool.set_kv_buffer(layer, loc, value.view(-1, 1, 1).expand(-1, 1, 2).clone(), -value.view(-1, 1, 1))
    for layer_id, (group, _) in enumerate(layers):
        loc = slots[group]
        expected = (layer_id * 1000 + loc).to(torch.float32)
        assert torch.equal(pool.get_key_buffer(layer_id)[loc][:, 0, 0], expected)
        assert torch.equal(pool.get_value_buffer(layer_id)[loc][:, 0, 0], -expected)
    assert pool.get_kv_size_bytes() == (9 * 6 * 2 * 4, 9 * 6 * 1 * 4)


def test_pages_move_between_groups_as_slots_come_and_go() -> None:
    """A group takes whole pages as its free slots run out and gives each back once none of its slots is held, so
    another group can take it; free slots go out lowest first."""
    arena = PageArena(4, [2, 1], 4)  # 3 pages: 2 tokens each for group 0, 4 for group 1
    first, second = (ArenaAllocator(arena, group, torch.float16, "cpu", None) for group in range(2))
    taken = first.alloc(5)
    assert taken.tolist() == [4, 5, 8, 9, 12]
    assert first.available_size() == 1 and second.available_size() == 0
    assert second.alloc(1) is None
    first.free(taken[2:4])  # page 2 empties
    assert arena.free_pages.tolist() == [2]
    assert second.alloc(3).tolist() == [8, 9, 10]
    assert arena.owner.tolist() == [-1, 0, 1, 0]
    assert arena.leaks() == []
    first.clear()
    assert arena.owner.tolist() == [-1, -1, 1, -1] and first.available_size() == 4


def test_a_prefill_the_arena_cannot_hold_changes_nothing() -> None:
    """``alloc_to_lengths`` for a row whose later groups need more pages than are free raises and leaves every
    group's slots, every page and every row as they were."""
    pool, allocator, cache = build_arena(PageArena(8, [4, 2, 2], 64), halving_planner)  # 7 pages of 16 / 32 / 32 tokens
    (row,) = pool.alloc_rows(1)
    full_slots = allocator.alloc(80)  # 5 pages
    pool.req_to_token[row, :80] = full_slots.to(torch.int32)
    owner, free_pages = arena_state = arena_snapshot(cache.arena)
    cache.expect([object()])
    with pytest.raises(RuntimeError, match="layer group 2 is out of KV slots"):
        pool.alloc_aux_to_lengths(req_pool_indices_cpu=torch.tensor([row]), target_seq_lens_cpu=torch.tensor([80]))
    assert arena_snapshot(cache.arena) == arena_state
    assert cache.lengths.sum() == 0 and cache.leaks() == []
    allocator.free(full_slots)
    pool.free_rows([row])
    assert cache.arena.free_page_count() == 7


def arena_snapshot(arena: PageArena) -> tuple[list[int], list[int]]:
    return arena.owner.tolist(), arena.free_pages.tolist()
