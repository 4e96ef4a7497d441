"""The layer groups' slots per request row: :class:`LayerGroupCache` (SGLang's auxiliary cache of the
``ReqToTokenPool``), which holds for groups ``1..`` an allocator and a request-to-token table each, plans new rows'
slots, trims them after a reduction, frees them, and prices admissions. A row whose plan keeps every token (a
text-only prompt) holds, in every later group, the *partners* of its group-0 slots, which live as long as the group-0
slots do, so SGLang's radix tree can keep a text-only prefix in every group. See README (SGLang, Memory).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator

from lightkv_adapters.sglang.arena import PageArena
from lightkv_core.plan import LengthPlan


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
        #: (rows,) rows whose plan keeps every token in every group: their later groups' slots are the partners of
        #: their group-0 slots (:attr:`partners`), and live as long as those do (in a row or in SGLang's radix tree)
        self.shared_rows = torch.zeros(rows, dtype=torch.bool)
        self.req_to_token = req_to_token_pool.req_to_token
        if arena is None:
            space = full_capacity + 1
        else:
            space = arena.pages * arena.tokens_per_page[0]
        #: per group after the first: the slot partnered with each group-0 slot (by :meth:`_slot_keys`), 0 if none
        self.partners = torch.zeros(len(self.allocators), space, dtype=torch.int64, device=device)
        self._expected: list = []

    # ---- what SGLang calls ------------------------------------------------------------------------------------

    def expect(self, reqs: Sequence) -> None:
        """The requests of the prefill batch whose rows :meth:`alloc_to_lengths` is about to get, in order."""
        self._expected = list(reqs)

    def alloc_to_lengths(self, *, req_pool_indices_cpu: torch.Tensor, target_seq_lens_cpu: torch.Tensor) -> None:
        """Grow each row to ``target`` tokens in group 0 (SGLang has written the row's group-0 slots): a new row
        (prefill) gets its plan's tokens in every group, a row that already holds tokens gets one slot per group
        per new token. A shared row (its plan keeps every token) takes, in every group, the partners of its group-0
        slots, and a partner for each group-0 slot without one (a prefix matched in SGLang's radix tree has them).

        Raises:
            RuntimeError if a group has too few free slots (nothing is allocated then), or a new row has no
            request to plan from.
        """
        rows = [int(row) for row in req_pool_indices_cpu.tolist()]
        targets = [int(n) for n in target_seq_lens_cpu.tolist()]
        expected, self._expected = self._expected, []
        wanted = self.lengths[:, rows].clone()
        shared = self.shared_rows[rows].clone()
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
                shared[i] = plan.keeps_every_token
            else:
                wanted[:, i] += target - held
        own = [i for i in range(len(rows)) if not shared[i]]
        counts = (wanted - self.lengths[:, rows])[:, own]
        shared_keys = [self._slot_keys(self.req_to_token[rows[i], : targets[i]]) for i in range(len(rows)) if shared[i]]
        unpartnered = (
            torch.unique(torch.cat(shared_keys))
            if shared_keys
            else torch.zeros(0, dtype=torch.int64, device=self.partners.device)
        )
        unpartnered = unpartnered[self.partners[0, unpartnered] == 0]
        allocated = []
        try:
            for group, allocator in enumerate(self.allocators):
                need = int(counts[group].sum()) + len(unpartnered)
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
            for i in own:
                start, end = int(self.lengths[group, rows[i]]), int(wanted[group, i])
                self.tables[group][rows[i], start:end] = slots[offset : offset + end - start].to(torch.int32)
                offset += end - start
            self.partners[group, unpartnered] = slots[offset:]
        shared_rows = [(rows[i], targets[i]) for i in range(len(rows)) if shared[i]]
        for (row, target), keys in zip(shared_rows, shared_keys, strict=True):
            for group, table in enumerate(self.tables):
                table[row, :target] = self.partners[group, keys].to(torch.int32)
        self.lengths[:, rows] = wanted
        self.full_lengths[rows] = torch.tensor(targets, dtype=torch.int64)
        self.shared_rows[rows] = shared

    def free(self, row: int) -> None:
        """Give back every slot ``row`` holds, in every group (SGLang frees the row: finish, abort, retraction). A
        shared row's slots go back with their group-0 partners instead (:meth:`release_partners`), which SGLang
        frees itself or keeps in its radix tree."""
        if not self.shared_rows[row]:
            for group, allocator in enumerate(self.allocators):
                length = int(self.lengths[group, row])
                if length:
                    allocator.free(self.tables[group][row, :length].to(torch.int64))
        self.lengths[:, row] = 0
        self.full_lengths[row] = 0
        self.shared_rows[row] = False

    def release_partners(self, first_slots: torch.Tensor) -> None:
        """Group 0 frees ``first_slots``: their partners in the later groups are freed with them."""
        keys = self._slot_keys(first_slots)
        for group, allocator in enumerate(self.allocators):
            partners = self.partners[group, keys]
            partners = partners[partners != 0]
            if partners.numel():
                allocator.free(partners)
                self.partners[group, keys] = 0

    def _slot_keys(self, first_slots: torch.Tensor) -> torch.Tensor:
        """Indices of group-0 slots in :attr:`partners` (in an arena, group 0's tokens of each page, packed)."""
        slots = first_slots.to(torch.int64)
        if self.arena is None:
            return slots
        per_page, rows = self.arena.tokens_per_page[0], self.arena.rows_per_page
        return slots // rows * per_page + slots % rows

    def clear(self) -> None:
        """Every slot free, every row empty (SGLang clears the pools)."""
        for allocator in self.allocators:
            allocator.clear()
        self.lengths.zero_()
        self.full_lengths.zero_()
        self.shared_rows.zero_()
        self.partners.zero_()
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
        if length != held and self.shared_rows[row]:
            raise RuntimeError(
                f"lightkv planned to keep every token of row {row} but the reduction kept {length} of {held} in layer "
                f"group {group}"
            )
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

    def make_room(self, demand: Sequence[int], reserved: Sequence[int], tree_cache: object | None) -> bool:
        """:meth:`fits`, after evicting what it takes from SGLang's radix tree ``tree_cache``: a cached text-only
        prefix holds a slot in every group, which goes back with its group-0 slot."""
        from sglang.srt.mem_cache.base_prefix_cache import EvictParams

        while not self.fits(demand, reserved):
            if tree_cache is None or not tree_cache.supports_prefix_sharing() or tree_cache.evictable_size() <= 0:
                return False
            tokens = self._tokens_short([need + held for need, held in zip(demand, reserved, strict=True)])
            if tree_cache.evict(EvictParams(num_tokens=tokens)).num_tokens_evicted == 0:
                return False
        return True

    def _tokens_short(self, total: Sequence[int]) -> int:
        """Text-only tokens (a slot in every group) whose slots would give ``total[g]`` free slots in every group."""
        if self.arena is None:
            return max(1, *(need - free for need, free in zip(total[1:], self.available(), strict=True)))
        pages = self.arena.pages_short(total) - self.arena.free_page_count()
        return max(1, math.ceil(pages * self.arena.rows_per_page / sum(self.arena.layer_counts)))

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
        """One message per group whose slots are not exactly the free ones plus the ones held by rows (shared rows
        excepted) or partnered with a group-0 slot, each once (in an arena: the slots of the pages the group holds),
        and per broken invariant of the arena."""
        problems = []
        for group, allocator in enumerate(self.allocators):
            own_rows = [
                self.tables[group][row, :length].to(torch.int64)
                for row, length in enumerate(self.lengths[group])
                if not self.shared_rows[row]
            ]
            partners = self.partners[group]
            owned = torch.cat([*own_rows, partners[partners != 0]])
            free = torch.cat([allocator.free_pages, allocator.release_pages]).cpu()
            every = torch.cat([owned.cpu(), free])
            if self.arena is None:
                expected = torch.arange(1, allocator.size + 1)
            else:
                expected = self.arena.group_slots(group + 1)
            if every.numel() != expected.numel() or not torch.equal(torch.sort(every).values, expected):
                problems.append(
                    f"lightkv layer group {group + 1}: {owned.numel()} slots held by rows or partnered with group 0 "
                    f"+ {free.numel()} free != {expected.numel()} it holds, or a slot is held twice"
                )
        if self.arena is not None:
            problems += self.arena.leaks()
        return problems
