"""One arena of KV pages shared by the layer groups: :class:`PageArena`, one :class:`ArenaAllocator` per group and
the K/V storage :class:`ArenaKVPool`.

A page is ``rows_per_page`` rows of K (and of V), each row one token of one layer. A page a group takes holds
``tokens_per_page[g] = rows_per_page // L_g`` tokens of its ``L_g`` layers, layer by layer: layer ``j`` of the
group keeps in-page token ``t`` at row ``page * rows_per_page + j * tokens_per_page[g] + t``. A group's token slot
is ``page * rows_per_page + t``, so every layer of the group reads the same slot ids from a view of the arena
shifted by ``j * tokens_per_page[g]`` rows, and SGLang's attention backends index it like any per-layer buffer.

Pages move between groups as requests come and go: a group takes pages when its free slots run out and gives a
page back once none of its slots is held. A request therefore costs its tokens times its layers, whatever mix of
text-only and compressed requests a server sees (README, SGLang: Memory). Page 0 is never handed out: SGLang writes
its padded tokens to slot 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

#: Fewest tokens of the deepest group a page holds (larger pages waste less to rounding, smaller ones less to pages
#: a group holds only partly).
MIN_PAGE_TOKENS = 16


def page_rows(group_layer_counts: Sequence[int], min_tokens: int = MIN_PAGE_TOKENS) -> int:
    """Rows of a page: the smallest multiple of the least common multiple of the groups' layer counts (so no row
    of a page is left over in any group) that gives every group at least ``min_tokens`` tokens per page."""
    lcm = math.lcm(*group_layer_counts)
    return lcm * math.ceil(min_tokens * max(group_layer_counts) / lcm)


class PageArena:
    """The pages and who holds them.

    Args:
        pages: pages in the arena, page 0 included (never handed out).
        group_layer_counts: layers of each group, group 0 first.
        rows_per_page: rows of a page (:func:`page_rows`).
        device: where the page tables live (the allocators' device).
    """

    def __init__(
        self, pages: int, group_layer_counts: Sequence[int], rows_per_page: int, device: str | torch.device = "cpu"
    ) -> None:
        if pages < 2:
            raise ValueError(f"a KV page arena needs at least 2 pages (page 0 is padding), got {pages}")
        if rows_per_page < max(group_layer_counts):
            raise ValueError(
                f"a page of {rows_per_page} rows cannot hold one token of {max(group_layer_counts)} layers"
            )
        self.pages = pages
        self.rows_per_page = rows_per_page
        self.layer_counts = list(group_layer_counts)
        self.tokens_per_page = [rows_per_page // count for count in group_layer_counts]
        self.device = device
        #: the group allocators, in group order (each registers itself)
        self.allocators: list[ArenaAllocator] = []
        self.clear()

    @classmethod
    def for_memory(
        cls, tokens: int, group_layer_counts: Sequence[int], device: str | torch.device = "cpu"
    ) -> PageArena:
        """The arena of :func:`page_rows`-row pages in the memory of a single pool of ``tokens`` slots (and SGLang's
        padding slot) in every layer."""
        rows = page_rows(group_layer_counts)
        return cls((tokens + 1) * sum(group_layer_counts) // rows, group_layer_counts, rows, device)

    def clear(self) -> None:
        """Every page free."""
        self.free_pages = torch.arange(1, self.pages, dtype=torch.int64, device=self.device)
        #: (pages,) group holding each page, -1 if none
        self.owner = torch.full((self.pages,), -1, dtype=torch.int64, device=self.device)
        #: (pages,) slots of each page its group holds for requests
        self.used = torch.zeros(self.pages, dtype=torch.int64, device=self.device)

    def free_page_count(self) -> int:
        return len(self.free_pages)

    def take(self, group: int, count: int) -> torch.Tensor | None:
        """``count`` free pages (the lowest ids) for ``group``, or ``None`` if fewer are free."""
        if count > len(self.free_pages):
            return None
        pages, self.free_pages = self.free_pages[:count], self.free_pages[count:]
        self.owner[pages] = group
        return pages

    def give(self, pages: torch.Tensor) -> None:
        """``pages`` (none of their slots held) are free again."""
        self.owner[pages] = -1
        self.free_pages = torch.sort(torch.cat((self.free_pages, pages))).values

    def layer_offsets(self) -> list[int]:
        """Per decoder layer (groups in order, layers in order): the row offset of its view of the arena."""
        return [
            index * tokens
            for tokens, count in zip(self.tokens_per_page, self.layer_counts, strict=True)
            for index in range(count)
        ]

    def pages_short(self, tokens: Sequence[int]) -> int:
        """Free pages that ``tokens[g]`` more slots in every group ``g`` would take beyond the groups' free slots."""
        return sum(
            math.ceil(max(0, need - len(allocator.free_pages)) / per_page)
            for need, allocator, per_page in zip(tokens, self.allocators, self.tokens_per_page, strict=True)
        )

    def fits(self, demand: Sequence[int], reserved: Sequence[int]) -> bool:
        """Whether ``demand[g]`` slots fit in every group ``g`` at once beyond ``reserved[g]`` (groups in order)."""
        total = [need + held for need, held in zip(demand, reserved, strict=True)]
        return self.pages_short(total) <= self.free_page_count()

    def pages_for(self, tokens: Sequence[int]) -> int:
        """Pages that ``tokens[g]`` slots in every group ``g`` take in an otherwise empty arena."""
        return sum(math.ceil(n / per_page) for n, per_page in zip(tokens, self.tokens_per_page, strict=True))

    def most_added(self, tokens: Sequence[int], limit: int) -> int:
        """The most slots ``n <= limit`` that every group ``g`` can hold besides ``tokens[g]`` in the empty arena
        (``tokens`` must fit it)."""
        low, high = 0, limit
        while low < high:
            middle = (low + high + 1) // 2
            if self.pages_for([n + middle for n in tokens]) <= self.pages - 1:
                low = middle
            else:
                high = middle - 1
        return low

    def text_capacity(self) -> int:
        """Most tokens a request holding a slot per token in every group (text only) keeps in the empty arena."""
        return self.most_added([0] * len(self.tokens_per_page), (self.pages - 1) * min(self.tokens_per_page))

    def slots_held_elsewhere(self, group: int) -> int:
        """Slots ``group`` would have in the pages the other groups hold."""
        owner = self.owner.cpu()
        return int(((owner >= 0) & (owner != group)).sum()) * self.tokens_per_page[group]

    def group_slots(self, group: int) -> torch.Tensor:
        """(n,) int64 on the CPU, ascending: the slots of the pages ``group`` holds."""
        pages = torch.nonzero(self.owner.cpu() == group).flatten()
        return (pages[:, None] * self.rows_per_page + torch.arange(self.tokens_per_page[group])).flatten()

    def state(self) -> dict[str, int]:
        return {"pages": self.pages - 1, "free_pages": self.free_page_count(), "rows_per_page": self.rows_per_page}

    def leaks(self) -> list[str]:
        """One message per broken invariant: every page free or held by one group, each group's free slots
        exactly the unheld slots of its pages, and ``used`` counting the rest."""
        problems = []
        owner = self.owner.cpu()
        free = sorted(self.free_pages.tolist())
        if free != [page for page in range(1, self.pages) if owner[page] == -1]:
            problems.append("lightkv page arena: the free pages are not exactly the pages no group holds")
        for group, allocator in enumerate(self.allocators):
            pages = torch.nonzero(owner == group).flatten()
            slots = self.group_slots(group)
            free_slots = allocator.free_pages.cpu()
            unheld = int(torch.isin(slots, free_slots).sum())
            if unheld != free_slots.numel() or free_slots.unique().numel() != free_slots.numel():
                problems.append(f"lightkv page arena, group {group}: a free slot lies outside its pages or twice")
            if int(self.used.cpu()[pages].sum()) != slots.numel() - unheld:
                problems.append(f"lightkv page arena, group {group}: held slots and page use counts disagree")
        return problems


class ArenaAllocator(TokenToKVPoolAllocator):
    """SGLang's token allocator for one layer group, drawing pages from a :class:`PageArena`.

    ``size`` is what the group would hold with the whole arena; ``available_size()`` its free slots plus what the
    free pages would give it (both shared with the other groups: :meth:`PageArena.fits` prices them together).
    Slots go out lowest first, so a group's requests pack into few pages and emptied pages return to the arena.
    """

    def __init__(self, arena: PageArena, group: int, dtype: torch.dtype, device: str, kvcache: object) -> None:
        if group != len(arena.allocators):
            raise ValueError(f"arena allocators register in group order: expected group {len(arena.allocators)}")
        self.arena = arena
        self.group = group
        self.tokens_per_page = arena.tokens_per_page[group]
        arena.allocators.append(self)
        super().__init__((arena.pages - 1) * self.tokens_per_page, dtype, device, kvcache, need_sort=False)

    def clear(self) -> None:
        super().clear()
        self.free_pages = torch.empty((0,), dtype=torch.int64, device=self.device)
        held = torch.nonzero(self.arena.owner == self.group).flatten()
        if held.numel():
            self.arena.used[held] = 0
            self.arena.give(held)

    def available_size(self) -> int:
        return len(self.free_pages) + self.arena.free_page_count() * self.tokens_per_page

    def alloc(self, need_size: int) -> torch.Tensor | None:
        short = need_size - len(self.free_pages)
        if short > 0:
            pages = self.arena.take(self.group, math.ceil(short / self.tokens_per_page))
            if pages is None:
                return None
            offsets = torch.arange(self.tokens_per_page, dtype=torch.int64, device=self.device)
            slots = (pages[:, None] * self.arena.rows_per_page + offsets).flatten()
            self.free_pages = torch.sort(torch.cat((self.free_pages, slots))).values
        selected, self.free_pages = self.free_pages[:need_size], self.free_pages[need_size:]
        self.arena.used.index_add_(0, selected // self.arena.rows_per_page, torch.ones_like(selected))
        return selected

    def free(self, free_index: torch.Tensor) -> None:
        if free_index.numel() == 0:
            return
        if self.free_group is not None:
            self.free_group.append(self._copy_for_free_group(free_index))
            return
        free_index = free_index.to(torch.int64)
        pages = free_index // self.arena.rows_per_page
        self.arena.used.index_add_(0, pages, -torch.ones_like(pages))
        touched = torch.unique(pages)
        emptied = touched[self.arena.used[touched] == 0]
        slots = torch.cat((self.free_pages, free_index))
        if emptied.numel():
            slots = slots[~torch.isin(slots // self.arena.rows_per_page, emptied)]
            self.arena.give(emptied)
        self.free_pages = torch.sort(slots).values


class ArenaKVPool(MHATokenToKVPool):
    """SGLang's MHA K/V pool whose per-layer buffers are views of one arena of pages (module docstring).

    Args:
        arena: the pages and their layout.
        dtype, head_num, head_dim, v_head_dim, device: as SGLang's ``MHATokenToKVPool``.
    """

    def __init__(
        self, arena: PageArena, dtype: torch.dtype, head_num: int, head_dim: int, v_head_dim: int, device: str
    ) -> None:
        self.arena = arena
        super().__init__(
            size=arena.pages * arena.rows_per_page - 1,
            page_size=1,
            dtype=dtype,
            head_num=head_num,
            head_dim=head_dim,
            layer_num=sum(arena.layer_counts),
            device=device,
            enable_memory_saver=False,
            v_head_dim=v_head_dim,
            enable_alt_stream=False,
            kv_cache_layout="nhd",
            allocation_label="lightkv page arena",
        )

    def _create_buffers_normal(self) -> None:
        rows = self.arena.pages * self.arena.rows_per_page
        self.k_arena = torch.zeros((rows, self.head_num, self.head_dim), dtype=self.store_dtype, device=self.device)
        self.v_arena = torch.zeros((rows, self.head_num, self.v_head_dim), dtype=self.store_dtype, device=self.device)
        offsets = self.arena.layer_offsets()
        self.k_buffer = [self.k_arena[offset:] for offset in offsets]
        self.v_buffer = [self.v_arena[offset:] for offset in offsets]

    def get_kv_size_bytes(self) -> tuple[int, int]:
        return (
            self.k_arena.numel() * self.k_arena.element_size(),
            self.v_arena.numel() * self.v_arena.element_size(),
        )
