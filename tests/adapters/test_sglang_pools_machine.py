"""Layer-group KV pools (``lightkv_adapters.sglang.pools``) on SGLang's real classes (CPU), property-based: a
Hypothesis state machine drives SGLang's ``ReqToTokenPool`` and token allocators through admissions, reductions,
decodes, finishes, aborts and over-allocations the way SGLang's scheduler does, with a radix tree that keeps
finished text-only requests, lends their prefixes to new ones and evicts them, checking slot conservation after
every step.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

if importlib.util.find_spec("sglang") is None:
    pytest.skip("SGLang is not installed", allow_module_level=True)

from lightkv_adapters.sglang import cpu_env  # noqa: E402

cpu_env.install()

from helpers.pool_machine import MAX_NEW, METHODS, Cached, Running, Tree, planner_of, requests  # noqa: E402
from helpers.sglang_pools import CONTEXT, NUM_LAYERS, assert_conserved, build_arena, build_pools  # noqa: E402

from lightkv_adapters.sglang.arena import PageArena  # noqa: E402
from lightkv_adapters.sglang.fixed_pools import pool_sizes  # noqa: E402
from lightkv_adapters.sglang.pools import group_demand, layer_groups  # noqa: E402
from lightkv_perf.capacity_requests import FakeReq  # noqa: E402


class LayerGroupPoolsMachine(RuleBasedStateMachine):
    """SGLang's scheduler on layer-group pools: prefill batches admitted against every pool, the forward's
    trims, decode batches, finishes, aborts (also before the reduction) and prefills the pools cannot hold, with
    every slot of every pool accounted for after each step."""

    @initialize(
        method=st.sampled_from(sorted(METHODS)),
        shared=st.booleans(),
        tokens=st.integers(1500, 3000),
        ratios=st.lists(st.floats(0.15, 1.0), min_size=3, max_size=3),
        need_sort=st.booleans(),
        reqs=st.lists(requests(), min_size=1, max_size=3),
    )
    def build(
        self, method: str, shared: bool, tokens: int, ratios: list[float], need_sort: bool, reqs: list[FakeReq]
    ) -> None:
        """Pools for the memory of a ``tokens``-slot stock pool: one arena of pages shared by the groups, or fixed
        pools split by ``ratios`` (as many as the method has later groups); and a first prefill batch."""
        reduction = METHODS[method]
        counts = [len(layers) for layers in layer_groups(reduction.reduce_layers, NUM_LAYERS)]
        if shared:
            arena = PageArena.for_memory(tokens, counts)
            self.pool, self.allocator, self.cache = build_arena(arena, planner_of(reduction))
            self.sizes = [self.allocator.size, *(allocator.size for allocator in self.cache.allocators)]
        else:
            self.sizes = pool_sizes(tokens, counts, ratios[: len(counts) - 1])
            self.pool, self.allocator, self.cache = build_pools(self.sizes, planner_of(reduction), need_sort)
        self.arena = self.cache.arena
        self.running: list[Running] = []
        self.tree = Tree(self.allocator)
        self.admit(reqs)

    # ---- rules ----------------------------------------------------------------------------------------------

    @rule(reqs=st.lists(requests(), min_size=1, max_size=3))
    def admit(self, reqs: list[FakeReq]) -> None:
        """A prefill batch: requests are admitted in order while a row is free and every pool has room for the
        prompt and decode budget beyond what the running requests may still decode and the batch already took
        (the plugin's admission hook; the group-0 check is SGLang's own). The batch then gets its rows, its
        group-0 slots and, in one ``alloc_aux_to_lengths``, each plan's slots in every later group."""
        decode = sum(running.remaining for running in self.running)
        reserved = [decode] * (len(self.cache.allocators) + 1)
        batch, plans = [], []
        for req in reqs:
            seq_len = len(req.full_untruncated_fill_ids)
            plan = self.cache.planner(req, seq_len)
            demand = [length + req.max_new_tokens + 1 for length in plan.lengths]
            assert group_demand(self.cache, req, req.max_new_tokens) == demand
            fits = self._fits(demand, reserved)
            assert self.cache.fits(demand, reserved) == fits
            if not fits and self.tree.evictable_size():
                # the pools evict cached text until the request fits, or nothing evictable is left
                fits = self.cache.make_room(demand, reserved, self.tree)
                assert fits == self._fits(demand, reserved) and (fits or not self.tree.evictable_size())
            if (
                not fits
                or len(batch) == self.pool.available_size()
                or demand[0] > self.allocator.available_size() - reserved[0]
            ):
                break
            batch.append(req)
            plans.append(plan)
            reserved = [held + need for held, need in zip(reserved, demand, strict=True)]
        if not batch:
            return
        seq_lens = [plan.lengths[0] for plan in plans]
        rows = self.pool.alloc_rows(len(batch))
        full_slots = self.allocator.alloc(sum(seq_lens))
        assert rows is not None and full_slots is not None
        for row, slots in zip(rows, full_slots.split(seq_lens), strict=True):
            self.pool.req_to_token[row, : slots.numel()] = slots.to(torch.int32)
        free = self.cache.available()
        self.cache.expect(batch)
        self.pool.alloc_aux_to_lengths(
            req_pool_indices_cpu=torch.tensor(rows), target_seq_lens_cpu=torch.tensor(seq_lens)
        )
        if self.arena is None:
            assert self.cache.available() == [
                before - sum(plan.lengths[group + 1] for plan in plans) for group, before in enumerate(free)
            ]
        for req, row, plan, slots in zip(batch, rows, plans, full_slots.split(seq_lens), strict=True):
            held = list(plan.lengths[1:])
            group_slots = [table[row, :length].clone() for table, length in zip(self.cache.tables, held, strict=True)]
            self.running.append(Running(req, row, plan, plan.lengths[0], slots.clone(), held, group_slots))

    @precondition(lambda self: any(not running.reduced for running in self.running))
    @rule(data=st.data())
    def reduce(self, data: st.DataObject) -> None:
        """The prefill's forward of one request on its own step, so that an abort can come between it and the
        request's first decode (decode and finish run it first where it has not run)."""
        self._reduce(data.draw(st.sampled_from([running for running in self.running if not running.reduced])), data)

    @precondition(lambda self: any(running.remaining for running in self.running))
    @rule(data=st.data())
    def decode(self, data: st.DataObject) -> None:
        """A decode batch of requests with budget left (their prefill forward first, where it has not run): the
        capacity check asks every pool, and the admission reservation guarantees it passes; each request then
        gets one slot per pool."""
        batch = data.draw(
            st.lists(
                st.sampled_from([running for running in self.running if running.remaining]), min_size=1, unique=True
            )
        )
        for running in batch:
            if not running.reduced:
                self._reduce(running, data)
        fits = self.allocator.check_decode_capacity(num_tokens=len(batch), tree_cache=None)
        assert fits == self._fits([len(batch)] * len(self.sizes), [0] * len(self.sizes))
        assert fits, "admission reserved every pool's room for the running requests' decode budget"
        slots = self.allocator.alloc(len(batch))
        rows = torch.tensor([running.row for running in batch])
        seq_lens = torch.tensor([running.seq_len for running in batch])
        self.pool.req_to_token[rows, seq_lens] = slots.to(torch.int32)
        self.pool.alloc_aux_to_lengths(req_pool_indices_cpu=rows, target_seq_lens_cpu=seq_lens + 1)
        for running, slot in zip(batch, slots, strict=True):
            running.seq_len += 1
            running.generated += 1
            running.full_slots = torch.cat([running.full_slots, slot.view(1)])
            for group, table in enumerate(self.cache.tables):
                running.held[group] += 1
                grown = table[running.row, : running.held[group]].clone()
                assert torch.equal(grown[:-1], running.group_slots[group]), "decode moved a held slot"
                running.group_slots[group] = grown

    @precondition(lambda self: self.running)
    @rule(data=st.data(), cache=st.booleans())
    def finish(self, data: st.DataObject, cache: bool) -> None:
        """A request ends (stop token or budget spent; its prefill forward first, where it has not run) and
        SGLang frees its slots and row, or (``cache``, a text-only request that reused no prefix) the radix tree
        keeps its group-0 slots and frees the row."""
        running = data.draw(st.sampled_from(self.running))
        if not running.reduced:
            self._reduce(running, data)
        if cache and running.shared and running.cached is None:
            self.tree.entries.append(Cached(running.full_slots.clone(), [s.clone() for s in running.group_slots]))
            self._release(running, keep=running.seq_len)
        else:
            self._release(running)

    @precondition(lambda self: self.tree.entries and self.pool.available_size() > 0)
    @rule(data=st.data(), extra=st.integers(1, 40), max_new=st.integers(1, MAX_NEW))
    def admit_cached(self, data: st.DataObject, extra: int, max_new: int) -> None:
        """A text-only request whose first ``prefix`` tokens match a cached entry: its row starts with the entry's
        group-0 slots, and it gets the same later-group slots the cached request had (their partners), plus
        fresh ones for its ``extra`` tokens. Admitted if every group has room for ``extra`` tokens and its decode
        budget (evicting other entries if needed)."""
        cached = data.draw(st.sampled_from(self.tree.entries))
        prefix = data.draw(st.integers(1, cached.slots.numel()))
        req = FakeReq((), range(prefix + extra), max_new, prefix_len=prefix)
        demand = group_demand(self.cache, req, max_new)
        assert demand == [extra + max_new + 1] * len(self.sizes)
        reserved = [sum(running.remaining for running in self.running)] * len(self.sizes)
        cached.locks += 1  # the match locks the entry, so making room cannot evict it
        if not self.cache.make_room(demand, reserved, self.tree) or extra > self.allocator.available_size():
            cached.locks -= 1
            return
        (row,) = self.pool.alloc_rows(1)
        fresh = self.allocator.alloc(extra)
        full_slots = torch.cat([cached.slots[:prefix], fresh])
        self.pool.req_to_token[row, : prefix + extra] = full_slots.to(torch.int32)
        self.cache.expect([req])
        self.pool.alloc_aux_to_lengths(
            req_pool_indices_cpu=torch.tensor([row]), target_seq_lens_cpu=torch.tensor([prefix + extra])
        )
        plan = self.cache.planner(req, prefix + extra)
        group_slots = [table[row, : prefix + extra].clone() for table in self.cache.tables]
        for slots, before in zip(group_slots, cached.group_slots, strict=True):
            assert torch.equal(slots[:prefix], before[:prefix]), "a reused prefix got other later-group slots"
        held = [prefix + extra] * len(self.cache.tables)
        self.running.append(
            Running(req, row, plan, prefix + extra, full_slots, held, group_slots, 0, False, prefix, cached)
        )

    @precondition(lambda self: any(not entry.locks for entry in self.tree.entries))
    @rule(data=st.data())
    def evict(self, data: st.DataObject) -> None:
        """The tree evicts an entry no running request uses: its group-0 slots, and their partners in every later
        group, are free again."""
        entry = data.draw(st.sampled_from([entry for entry in self.tree.entries if not entry.locks]))
        free = self.cache.available()
        self.tree.drop(entry)
        if self.arena is None:
            assert self.cache.available() == [before + entry.slots.numel() for before in free]

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        """A request is aborted or retracted, possibly between its allocation and its reduction."""
        self._release(data.draw(st.sampled_from(self.running)))

    @precondition(lambda self: self.pool.available_size() > 0 and self.arena is None)
    @rule(req=requests())
    def over_allocate(self, req: FakeReq) -> None:
        """A prefill (past admission) whose plan needs more slots than a later pool has free: trailing text is
        added until one group overflows while group 0 still has room. ``alloc_to_lengths`` raises and leaves
        every pool and row as it was; SGLang then frees the group-0 slots and the row."""
        seq_len = len(req.full_untruncated_fill_ids)
        plan = self.cache.planner(req, seq_len)
        free = self.cache.available()
        seq_len += min(max(0, before - planned + 1) for before, planned in zip(free, plan.lengths[1:], strict=True))
        if seq_len > min(self.allocator.available_size(), CONTEXT):
            return
        req = FakeReq(req.spans, range(seq_len), req.max_new_tokens)
        plan = self.cache.planner(req, seq_len)
        assert any(planned > before for before, planned in zip(free, plan.lengths[1:], strict=True))
        (row,) = self.pool.alloc_rows(1)
        full_slots = self.allocator.alloc(seq_len)
        self.pool.req_to_token[row, :seq_len] = full_slots.to(torch.int32)
        lengths, full_lengths = self.cache.lengths.clone(), self.cache.full_lengths.clone()
        tables = [table.clone() for table in self.cache.tables]
        self.cache.expect([req])
        with pytest.raises(RuntimeError, match="out of KV slots"):
            self.pool.alloc_aux_to_lengths(
                req_pool_indices_cpu=torch.tensor([row]), target_seq_lens_cpu=torch.tensor([seq_len])
            )
        assert self.cache.available() == free
        assert torch.equal(self.cache.lengths, lengths) and torch.equal(self.cache.full_lengths, full_lengths)
        assert all(torch.equal(table, before) for table, before in zip(self.cache.tables, tables, strict=True))
        self.allocator.free(full_slots)
        self.pool.free_rows([row])

    # ---- invariants -----------------------------------------------------------------------------------------

    @invariant()
    def no_leaks(self) -> None:
        """The cache's own conservation check (what the scheduler's leak report gets) finds nothing."""
        assert self.cache.leaks() == []

    @invariant()
    def slots_are_conserved(self) -> None:
        """In every pool (group 0 with SGLang's table, later groups with the cache's), free slots plus the rows'
        slots make up the pool, each slot once."""
        cached = [entry.slots for entry in self.tree.entries]
        rows = [self.pool.req_to_token[run.row, run.prefix : run.seq_len] for run in self.running]
        assert_conserved(self.allocator, [*rows, *cached])
        for group, allocator in enumerate(self.cache.allocators):
            rows = [self.cache.tables[group][run.row, run.prefix : run.held[group]] for run in self.running]
            assert_conserved(allocator, [*rows, *(entry.group_slots[group] for entry in self.tree.entries)])

    @invariant()
    def rows_hold_what_was_allocated(self) -> None:
        """Each running request's row holds its tokens and slots in every group; every other row (free or
        SGLang's padding row) holds nothing."""
        full_lengths, lengths = torch.zeros_like(self.cache.full_lengths), torch.zeros_like(self.cache.lengths)
        for running in self.running:
            full_lengths[running.row] = running.seq_len
            lengths[:, running.row] = torch.tensor(running.held)
            assert torch.equal(self.pool.req_to_token[running.row, : running.seq_len].long(), running.full_slots)
            for table, slots in zip(self.cache.tables, running.group_slots, strict=True):
                assert torch.equal(table[running.row, : slots.numel()], slots)
        assert torch.equal(self.cache.full_lengths, full_lengths)
        assert torch.equal(self.cache.lengths, lengths)
        assert not self.cache.lengths[:, self.pool.free_slots].any()

    @invariant()
    def decode_capacity_is_what_every_group_can_take(self) -> None:
        """A decode step of ``n`` tokens fits exactly when every pool, group 0 included, has ``n`` free slots (in an
        arena: when the groups' free slots and the free pages hold ``n`` more tokens in every group at once)."""
        count = len(self.sizes)
        largest = max(
            n
            for n in range(min(self.allocator.available_size(), *self.cache.available()) + 1)
            if self._fits([n] * count, [0] * count)
        )
        assert self.allocator.check_decode_capacity(num_tokens=largest, tree_cache=None)
        assert not self.allocator.check_decode_capacity(num_tokens=largest + 1, tree_cache=None)

    def teardown(self) -> None:
        """Every request released and every cached entry evicted: every pool is back to all of its slots."""
        for running in list(self.running):
            self._release(running)
        for entry in list(self.tree.entries):
            self.tree.drop(entry)
        assert self.allocator.available_size() == self.sizes[0]
        assert self.cache.available() == self.sizes[1:]
        assert self.cache.leaks() == []
        if self.arena is not None:
            assert self.arena.free_page_count() == self.arena.pages - 1

    # ---- helpers --------------------------------------------------------------------------------------------

    def _fits(self, demand: list[int], reserved: list[int]) -> bool:
        """The test's own account of whether ``demand[g]`` more slots fit in every group beyond ``reserved[g]``:
        fixed pools each alone (group 0 is SGLang's check), an arena by the pages the groups' shortfalls take."""
        groups = [self.allocator, *self.cache.allocators]
        if self.arena is None:
            return all(
                d + r <= a.available_size() for d, r, a in zip(demand[1:], reserved[1:], groups[1:], strict=True)
            )
        pages = 0
        for need, held, allocator in zip(demand, reserved, groups, strict=True):
            short = need + held - len(allocator.free_pages)
            pages += -(-short // allocator.tokens_per_page) if short > 0 else 0
        return pages <= self.arena.free_page_count()

    def _reduce(self, running: Running, data: st.DataObject) -> None:
        """The prefill's forward: each reduction keeps between its plan's lower and upper bound, never more than
        the group before, and gives the slots reserved past them back to the group's pool."""
        kept = running.seq_len
        for group in range(1, len(running.plan.lengths)):
            high, low = min(running.plan.lengths[group], kept), running.plan.lower[group]
            assert low <= high, f"plan {running.plan} has no room for a non-increasing survivor count"
            kept = data.draw(st.integers(low, high))
            allocator = self.cache.allocators[group - 1]
            free = allocator.available_size()
            self.cache.trim(group, running.row, kept)
            assert allocator.available_size() == free + running.held[group - 1] - kept
            running.held[group - 1] = kept
            running.group_slots[group - 1] = running.group_slots[group - 1][:kept]
        running.reduced = True

    def _release(self, running: Running, keep: int = 0) -> None:
        """What SGLang does when a request leaves: its group-0 slots (but the prefix it borrowed from the tree,
        and the ``keep`` first ones the tree takes over) back to the allocator, its row (and with it the row's
        slots in every later group, or, for a text-only row, the partners of the group-0 slots freed) back to the
        request pool."""
        free = self.cache.available()
        start = max(running.prefix, keep)
        self.allocator.free(self.pool.req_to_token[running.row, start : running.seq_len].to(torch.int64))
        self.pool.free_rows([running.row])
        self.running.remove(running)
        if running.cached is not None:
            running.cached.locks -= 1
        if self.arena is None:
            back = [held - start if running.shared else held for held in running.held]
            assert self.cache.available() == [before + n for before, n in zip(free, back, strict=True)]


TestLayerGroupPools = LayerGroupPoolsMachine.TestCase
TestLayerGroupPools.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)
