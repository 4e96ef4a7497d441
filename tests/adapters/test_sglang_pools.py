"""Layer-group KV pools (``lightkv_adapters.sglang.pools``) on SGLang's real classes (CPU): a state machine drives
SGLang's ``ReqToTokenPool`` and token allocators through admissions, reductions, decodes, finishes, aborts and
over-allocations the way SGLang's scheduler does, checking slot conservation after every step; unit tests cover
the pool sizing, the ``--kv-compress-pool-ratios`` flag and the plugin's scheduler hooks.
"""

from __future__ import annotations

import argparse
import importlib.util
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

if importlib.util.find_spec("sglang") is None:
    pytest.skip("SGLang is not installed", allow_module_level=True)

from lightkv_adapters.sglang import cpu_env  # noqa: E402

cpu_env.install()

from sglang.srt.managers.schedule_policy import AddReqResult  # noqa: E402
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool  # noqa: E402

from lightkv_adapters.sglang.admission import (  # noqa: E402
    POOL_HOOKS,
    admission_hook,
    pool_check_hook,
    prefill_requests_hook,
)
from lightkv_adapters.sglang.pools import (  # noqa: E402
    LayerGroupAllocator,
    LayerGroupCache,
    admits,
    check_pool_ratios,
    default_pool_ratios,
    group_demand,
    layer_groups,
    pool_sizes,
)
from lightkv_adapters.sglang.settings import add_kv_compress_args, kv_compress_settings  # noqa: E402
from lightkv_core.config import PRESET_DEPTHS, LightKVConfig  # noqa: E402
from lightkv_core.methods import FastV, LightKV, PrefillReduction  # noqa: E402
from lightkv_core.plan import LengthPlan  # noqa: E402
from lightkv_core.spans import VisionSpan  # noqa: E402
from lightkv_perf.capacity_requests import FakeReq  # noqa: E402

#: Decoder depth of the state machine's model.
NUM_LAYERS = 8
#: Methods the state machine plans with: LightKV schedules scaled to ``NUM_LAYERS`` (LLaVA's windows nest, so
#: its plans are mostly exact; Qwen2.5-VL's 6-4-2 windows do not, so many of its plans are only bounds) and FastV.
METHODS: dict[str, PrefillReduction] = {
    "lightkv-llava": LightKV(LightKVConfig.preset("llava-1.5").scaled_to(NUM_LAYERS, PRESET_DEPTHS["llava-1.5"])),
    "lightkv-qwen": LightKV(LightKVConfig.preset("qwen2.5-vl").scaled_to(NUM_LAYERS, PRESET_DEPTHS["qwen2.5-vl"])),
    "fastv": FastV(2, 0.5),
}
#: Request-pool rows and context length of the state machine's ``ReqToTokenPool``.
ROWS, CONTEXT = 6, 4096
#: Most tokens a state-machine request decodes.
MAX_NEW = 128
DTYPE = torch.float16


# --- shared helpers ----------------------------------------------------------------------------------------------


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


def halving_planner(req: object, seq_len: int) -> LengthPlan:
    """Two later groups holding half and a quarter of the prompt."""
    return LengthPlan.exactly((seq_len, seq_len // 2, seq_len // 4))


def assert_conserved(allocator: TokenToKVPoolAllocator, owned: Sequence[torch.Tensor]) -> None:
    """Every slot of ``allocator`` is either free or held by exactly one of the ``owned`` rows."""
    held = torch.cat([slots.to(torch.int64) for slots in owned] or [torch.zeros(0, dtype=torch.int64)])
    free = torch.cat([allocator.free_pages, allocator.release_pages])
    assert free.numel() == allocator.available_size()
    assert held.numel() + free.numel() == allocator.size
    every = torch.sort(torch.cat([held, free])).values
    assert torch.equal(every, torch.arange(1, allocator.size + 1)), "a slot is held twice, or held and free"


# --- the state machine -------------------------------------------------------------------------------------------


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

    @property
    def remaining(self) -> int:
        """Tokens the request may still decode."""
        return self.req.max_new_tokens - self.generated


@st.composite
def requests(draw: st.DrawFn) -> FakeReq:
    """A prompt of one or two images of 8..24 tokens per side, with text before, between and after them."""
    position = draw(st.integers(0, 20))
    spans = []
    for _ in range(draw(st.integers(1, 2))):
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


class LayerGroupPoolsMachine(RuleBasedStateMachine):
    """SGLang's scheduler on layer-group pools: prefill batches admitted against every pool, the forward's
    trims, decode batches, finishes, aborts (also before the reduction) and prefills the pools cannot hold, with
    every slot of every pool accounted for after each step."""

    @initialize(
        method=st.sampled_from(sorted(METHODS)),
        tokens=st.integers(1500, 3000),
        ratios=st.lists(st.floats(0.15, 1.0), min_size=3, max_size=3),
        need_sort=st.booleans(),
        reqs=st.lists(requests(), min_size=1, max_size=3),
    )
    def build(self, method: str, tokens: int, ratios: list[float], need_sort: bool, reqs: list[FakeReq]) -> None:
        """Pools for a ``tokens``-slot stock pool split by ``ratios`` (as many as the method has later groups),
        and a first prefill batch."""
        reduction = METHODS[method]
        counts = [len(layers) for layers in layer_groups(reduction.reduce_layers, NUM_LAYERS)]
        self.sizes = pool_sizes(tokens, counts, ratios[: len(counts) - 1])
        self.pool, self.allocator, self.cache = build_pools(self.sizes, planner_of(reduction), need_sort)
        self.running: list[Running] = []
        self.admit(reqs)

    # ---- rules ----------------------------------------------------------------------------------------------

    @rule(reqs=st.lists(requests(), min_size=1, max_size=3))
    def admit(self, reqs: list[FakeReq]) -> None:
        """A prefill batch: requests are admitted in order while a row is free and every pool has room for the
        prompt and decode budget beyond what the running requests may still decode and the batch already took
        (the plugin's admission hook; the group-0 check is SGLang's own). The batch then gets its rows, its
        group-0 slots and, in one ``alloc_aux_to_lengths``, each plan's slots in every later group."""
        decode = sum(running.remaining for running in self.running)
        reserved, reserved_full = [decode] * len(self.cache.allocators), decode
        batch, plans = [], []
        for req in reqs:
            seq_len = len(req.full_untruncated_fill_ids)
            plan = self.cache.planner(req, seq_len)
            demand = [length + req.max_new_tokens + 1 for length in plan.lengths[1:]]
            assert group_demand(self.cache, req, req.max_new_tokens) == demand
            room = [free - held for free, held in zip(self.cache.available(), reserved, strict=True)]
            fits = all(need <= free for need, free in zip(demand, room, strict=True))
            assert admits(self.cache, demand, reserved) == fits
            if (
                not fits
                or len(batch) == self.pool.available_size()
                or seq_len + req.max_new_tokens + 1 > self.allocator.available_size() - reserved_full
            ):
                break
            batch.append(req)
            plans.append(plan)
            reserved = [held + need for held, need in zip(reserved, demand, strict=True)]
            reserved_full += seq_len + req.max_new_tokens + 1
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
        smallest = min(self.allocator.available_size(), *self.cache.available())
        fits = self.allocator.check_decode_capacity(num_tokens=len(batch), tree_cache=None)
        assert fits == (len(batch) <= smallest)
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
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        """A request ends (stop token or budget spent; its prefill forward first, where it has not run) and
        SGLang frees its slots and row."""
        running = data.draw(st.sampled_from(self.running))
        if not running.reduced:
            self._reduce(running, data)
        self._release(running)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        """A request is aborted or retracted, possibly between its allocation and its reduction."""
        self._release(data.draw(st.sampled_from(self.running)))

    @precondition(lambda self: self.pool.available_size() > 0)
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
        with pytest.raises(RuntimeError, match="out of slots"):
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
        assert_conserved(self.allocator, [self.pool.req_to_token[run.row, : run.seq_len] for run in self.running])
        for group, allocator in enumerate(self.cache.allocators):
            lengths = self.cache.lengths[group].tolist()
            assert allocator.available_size() + sum(lengths) == allocator.size
            table = self.cache.tables[group]
            assert_conserved(allocator, [table[row, :length] for row, length in enumerate(lengths)])

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
    def decode_capacity_is_the_smallest_pool(self) -> None:
        """A decode step of ``n`` tokens fits exactly when every pool, group 0 included, has ``n`` free slots."""
        smallest = min(self.allocator.available_size(), *self.cache.available())
        assert self.allocator.check_decode_capacity(num_tokens=smallest, tree_cache=None)
        assert not self.allocator.check_decode_capacity(num_tokens=smallest + 1, tree_cache=None)

    def teardown(self) -> None:
        """Every request released: every pool is back to all of its slots."""
        for running in list(self.running):
            self._release(running)
        assert self.allocator.available_size() == self.sizes[0]
        assert self.cache.available() == self.sizes[1:]
        assert self.cache.leaks() == []

    # ---- helpers --------------------------------------------------------------------------------------------

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

    def _release(self, running: Running) -> None:
        """What SGLang does when a request leaves: its group-0 slots back to the allocator, its row (and with
        it the row's slots in every later group) back to the request pool."""
        free = self.cache.available()
        self.allocator.free(self.pool.req_to_token[running.row, : running.seq_len].to(torch.int64))
        self.pool.free_rows([running.row])
        self.running.remove(running)
        assert self.cache.available() == [before + held for before, held in zip(free, running.held, strict=True)]


TestLayerGroupPools = LayerGroupPoolsMachine.TestCase
TestLayerGroupPools.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)


def test_clearing_the_request_pool_empties_every_group() -> None:
    """SGLang's ``ReqToTokenPool.clear`` clears the attached cache: every row empty, every slot free."""
    pool, _, cache = build_pools([1000, 500, 250], halving_planner)
    rows = pool.alloc_rows(2)
    cache.expect([object(), object()])
    pool.alloc_aux_to_lengths(req_pool_indices_cpu=torch.tensor(rows), target_seq_lens_cpu=torch.tensor([40, 80]))
    assert cache.available() == [440, 220]
    pool.clear()
    assert cache.available() == [500, 250]
    assert not cache.lengths.any() and not cache.full_lengths.any()
    assert cache.leaks() == []


def test_trim_past_the_plan_raises() -> None:
    """A reduction that kept more tokens than the plan reserved (a plan that was not an upper bound) is an
    error, and leaves the row as it was."""
    pool, _, cache = build_pools([100, 50, 25], halving_planner)
    (row,) = pool.alloc_rows(1)
    cache.expect([object()])
    pool.alloc_aux_to_lengths(req_pool_indices_cpu=torch.tensor([row]), target_seq_lens_cpu=torch.tensor([40]))
    with pytest.raises(RuntimeError, match="planned 10 tokens for row .* in layer group 2 but the reduction kept 11"):
        cache.trim(2, row, 11)
    assert cache.lengths[:, row].tolist() == [20, 10]
    assert cache.available() == [30, 15]


# --- pool sizes --------------------------------------------------------------------------------------------------


def test_layer_groups_split_after_each_reduce_layer() -> None:
    """LLaVA's LightKV layers 12/18/24 of 32, FastV after layer 2 of 5, and the state machine's split."""
    assert [len(group) for group in layer_groups((12, 18, 24), 32)] == [13, 6, 6, 7]
    assert layer_groups((2,), 5) == [[0, 1, 2], [3, 4]]
    assert layer_groups((3, 4, 6), NUM_LAYERS) == [[0, 1, 2, 3], [4], [5, 6], [7]]


def test_pool_sizes_of_llava_spend_the_stock_memory_on_more_tokens() -> None:
    """LLaVA's 32 layers split 13/6/6/7 by LightKV: group 0 holds about 1.7x the stock pool's tokens."""
    tokens, counts, ratios = 100_000, [13, 6, 6, 7], (0.52, 0.28, 0.16)
    sizes = pool_sizes(tokens, counts, ratios)
    assert sum(size * count for size, count in zip(sizes, counts, strict=True)) <= tokens * 32
    assert sizes[0] == pytest.approx(tokens * 32 / (13 + 0.52 * 6 + 0.28 * 6 + 0.16 * 7), abs=1)
    assert 1.65 < sizes[0] / tokens < 1.75
    assert sizes[1:] == [int(ratio * sizes[0]) for ratio in ratios]


@given(
    tokens=st.integers(1, 10**6),
    counts=st.lists(st.integers(1, 16), min_size=2, max_size=5),
    data=st.data(),
)
def test_pool_sizes_never_exceed_the_stock_budget(tokens: int, counts: list[int], data: st.DataObject) -> None:
    """Any split: the groups' layer-slots fit the stock pool's, group 0 never holds fewer tokens than the stock
    pool, and rounding wastes less than two tokens' worth of every layer."""
    ratios = data.draw(
        st.lists(st.floats(0.0, 1.0, exclude_min=True), min_size=len(counts) - 1, max_size=len(counts) - 1)
    )
    sizes = pool_sizes(tokens, counts, ratios)
    used = sum(size * count for size, count in zip(sizes, counts, strict=True))
    assert tokens * sum(counts) - 2 * sum(counts) < used <= tokens * sum(counts)
    assert sizes[0] >= tokens
    assert all(0 <= size <= ratio * sizes[0] for size, ratio in zip(sizes[1:], ratios, strict=True))


def test_default_pool_ratios_follow_the_plan_of_a_vision_dominated_request() -> None:
    """Five 24x24 images and 100 text tokens (2,980 tokens; LightKV's stages keep 1,540, 820 and 460, FastV's
    drop 1,540) and 128 decoded tokens, which take a slot in every group."""
    held = [length + 128 for length in (2980, 1540, 820, 460)]
    assert default_pool_ratios(LightKV(LightKVConfig.preset("llava-1.5"))) == tuple(n / held[0] for n in held[1:])
    assert default_pool_ratios(FastV(2, 0.5)) == (held[1] / held[0],)


@pytest.mark.parametrize(
    ("ratios", "message"),
    [
        ((0.5, 0.3), r"one ratio per layer group after the first \(3\), got 2"),
        ((0.5, 0.3, 0.2, 0.1), r"one ratio per layer group after the first \(3\), got 4"),
        ((0.5, 0.0, 0.2), r"must lie in \(0, 1\]"),
        ((0.5, 1.5, 0.2), r"must lie in \(0, 1\]"),
        ((-0.1, 0.3, 0.2), r"must lie in \(0, 1\]"),
    ],
)
def test_check_pool_ratios_rejects(ratios: tuple[float, ...], message: str) -> None:
    """Four layer groups need three ratios, each in ``(0, 1]``."""
    with pytest.raises(ValueError, match=r"--kv-compress-pool-ratios .*" + message):
        check_pool_ratios(ratios, 4)


def test_check_pool_ratios_accepts_one_ratio_in_range_per_later_group() -> None:
    """One ratio in ``(0, 1]`` per later group (none for a single group) passes."""
    check_pool_ratios((1.0, 0.5, 1e-3), 4)
    check_pool_ratios((), 1)


# --- --kv-compress-pool-ratios -------------------------------------------------------------------------------------


def _parse(*flags: str) -> dict:
    """The ``--kv-compress*`` flags parsed by a parser that ``add_kv_compress_args`` set up."""
    parser = argparse.ArgumentParser()
    add_kv_compress_args(parser)
    return vars(parser.parse_args(list(flags)))


@pytest.mark.parametrize(
    ("flags", "grouped_pools", "pool_ratios"),
    [
        ((), True, None),
        (("--kv-compress-pool-ratios", "auto"), True, None),
        (("--kv-compress-pool-ratios", " AUTO "), True, None),
        (("--kv-compress-pool-ratios", "off"), False, None),
        (("--kv-compress-pool-ratios", "0.5,0.3,0.2"), True, (0.5, 0.3, 0.2)),
        (("--kv-compress-pool-ratios", "1"), True, (1.0,)),
    ],
)
def test_pool_ratios_flag(flags: tuple[str, ...], grouped_pools: bool, pool_ratios: tuple | None) -> None:
    """``auto`` (the default) derives the ratios at start-up, ``off`` keeps one pool, a list gives the ratios."""
    settings = kv_compress_settings(**_parse("--kv-compress", "lightkv", *flags))
    assert (settings.grouped_pools, settings.pool_ratios) == (grouped_pools, pool_ratios)


def test_unparsable_pool_ratios_are_usage_errors(capsys: pytest.CaptureFixture) -> None:
    """A value that is neither a word nor a list of numbers is an ``argparse`` usage error naming the flag."""
    with pytest.raises(SystemExit):
        _parse("--kv-compress", "lightkv", "--kv-compress-pool-ratios", "abc")
    error = capsys.readouterr().err
    assert (
        "argument --kv-compress-pool-ratios: --kv-compress-pool-ratios takes a comma-separated list of floats" in error
    )
    assert "got 'abc'" in error


@pytest.mark.parametrize(
    ("method", "ratios", "message"),
    [
        ("lightkv", "0", r"--kv-compress-pool-ratios must lie in \(0, 1\], got \(0.0,\)"),
        ("lightkv", "1.5", r"--kv-compress-pool-ratios must lie in \(0, 1\], got \(1.5,\)"),
        ("fastv", "0.5,0", r"--kv-compress-pool-ratios must lie in \(0, 1\]"),
        ("none", "0.5", "--kv-compress-pool-ratios need --kv-compress lightkv or fastv"),
    ],
)
def test_bad_pool_ratios_name_the_flag(method: str, ratios: str, message: str) -> None:
    """Ratios out of ``(0, 1]``, or ratios without compression, are rejected with the flag's name."""
    values = _parse("--kv-compress", method, "--kv-compress-pool-ratios", ratios)
    with pytest.raises(ValueError, match=message):
        kv_compress_settings(**values)


@pytest.mark.parametrize(
    ("value", "grouped_pools", "pool_ratios"),
    [("Off", False, None), ([0.5, 0.25], True, (0.5, 0.25)), (0.5, True, (0.5,)), (None, True, None)],
)
def test_pool_ratios_keyword(value: object, grouped_pools: bool, pool_ratios: tuple | None) -> None:
    """The ``Engine`` keyword takes the words, sequences and single numbers too."""
    settings = kv_compress_settings("lightkv", kv_compress_pool_ratios=value)
    assert (settings.grouped_pools, settings.pool_ratios) == (grouped_pools, pool_ratios)


# --- scheduler hooks -----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class HookReq:
    """The parts of SGLang's ``Req`` the admission hook reads; ``set_finish_with_abort`` records its message."""

    full_untruncated_fill_ids: range
    sampling_params: SimpleNamespace
    output_ids: list[int] = field(default_factory=list)
    finished_reason: object = None
    abort_messages: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, prompt: int, max_new_tokens: int, generated: int = 0) -> HookReq:
        """A request of ``prompt`` tokens that may decode ``max_new_tokens`` and has decoded ``generated``."""
        return cls(range(prompt), SimpleNamespace(max_new_tokens=max_new_tokens), list(range(generated)))

    def set_finish_with_abort(self, error_msg: str) -> None:
        self.abort_messages.append(error_msg)


@dataclass(eq=False)
class FakeAdder:
    """The parts of SGLang's ``PrefillAdder`` the admission hook reads."""

    token_to_kv_pool_allocator: object
    running_batch: SimpleNamespace | None = None
    can_run_list: list = field(default_factory=list)

    def _get_running_request_total_token_offset(self, req: HookReq) -> int:
        """Tokens a running request may still decode (SGLang scales them by its decode-ratio estimate)."""
        return req.sampling_params.max_new_tokens - len(req.output_ids)


def admit_all(adder: FakeAdder, req: HookReq, *args: object, **kwargs: object) -> AddReqResult:
    """SGLang's ``add_one_req`` with room for everything."""
    adder.can_run_list.append(req)
    return AddReqResult.CONTINUE


def admit_none(adder: FakeAdder, req: HookReq, *args: object, **kwargs: object) -> AddReqResult:
    """SGLang's ``add_one_req`` turning the request down for its own reasons."""
    return AddReqResult.OTHER


def test_admission_reserves_every_group_until_one_is_full() -> None:
    """Each admitted request reserves its planned tokens, decode budget and a spare slot in every later group,
    on top of the running requests' decode budget; a request a group cannot take gets ``NO_TOKEN`` without
    reaching SGLang's own check."""
    _, allocator, _ = build_pools([1000, 500, 250], halving_planner)
    running = SimpleNamespace(reqs=[HookReq.of(100, 12, generated=2)])
    adder = FakeAdder(allocator, running)
    req = HookReq.of(200, 20)  # demand: 100 + 21 and 50 + 21
    for admitted in range(1, 4):
        assert admission_hook(admit_all, adder, req, False, None) is AddReqResult.CONTINUE
        assert adder.lightkv_reserved == [10 + 121 * admitted, 10 + 71 * admitted]
    # group 2 has 250 - 223 = 27 slots left for a demand of 71
    assert admission_hook(admit_all, adder, req, False, None) is AddReqResult.NO_TOKEN
    assert len(adder.can_run_list) == 3
    assert adder.lightkv_reserved == [373, 223]
    assert req.abort_messages == []


def test_admission_counts_free_slots_not_sizes() -> None:
    """Slots held by admitted requests are not free: a pool that is partly taken admits less."""
    pool, allocator, cache = build_pools([1000, 500, 250], halving_planner)
    (row,) = pool.alloc_rows(1)
    cache.expect([HookReq.of(800, 0)])
    pool.alloc_aux_to_lengths(req_pool_indices_cpu=torch.tensor([row]), target_seq_lens_cpu=torch.tensor([800]))
    assert cache.available() == [100, 50]
    adder = FakeAdder(allocator)
    assert admission_hook(admit_all, adder, HookReq.of(100, 0), False, None) is AddReqResult.CONTINUE
    assert admission_hook(admit_all, adder, HookReq.of(100, 30), False, None) is AddReqResult.NO_TOKEN
    assert adder.lightkv_reserved == [51, 26]


def test_admission_declined_by_sglang_reserves_nothing() -> None:
    """A request SGLang's own check turns down reserves no slots in the later groups."""
    _, allocator, _ = build_pools([1000, 500, 250], halving_planner)
    adder = FakeAdder(allocator)
    assert admission_hook(admit_none, adder, HookReq.of(200, 20), False, None) is AddReqResult.OTHER
    assert adder.lightkv_reserved == [0, 0]


def test_admission_without_pools_is_sglang_alone() -> None:
    """Without layer-group pools (``--kv-compress-pool-ratios off``) the hook only calls SGLang's check."""
    adder = FakeAdder(SimpleNamespace(groups=None))
    assert admission_hook(admit_all, adder, HookReq.of(10**6, 10**6), False, None) is AddReqResult.CONTINUE
    assert not hasattr(adder, "lightkv_reserved")


def test_admission_aborts_a_request_no_group_can_ever_hold() -> None:
    """A prompt past a group's whole pool can never be served: the request is aborted with a message naming the
    flag that fixes it and not admitted in this pass (SGLang's abort stub is admitted at the next one)."""
    _, allocator, _ = build_pools([1000, 500, 250], halving_planner)
    adder = FakeAdder(allocator)
    req = HookReq.of(1200, 0)  # prompt demand: 601 exceeds 500, 301 exceeds 250
    assert admission_hook(admit_all, adder, req, False, None) is AddReqResult.CONTINUE
    (message,) = req.abort_messages
    assert "[601, 301]" in message and "groups [1, 2]" in message and "[500, 250]" in message
    assert "--kv-compress-pool-ratios" in message
    assert adder.lightkv_reserved == [0, 0]


def test_admission_clips_a_decode_budget_past_a_group_to_the_pool() -> None:
    """A prompt that fits with a decode budget past a group's whole pool is admitted, its demand clipped."""
    _, allocator, _ = build_pools([1000, 500, 250], halving_planner)
    adder = FakeAdder(allocator)
    req = HookReq.of(200, 300)  # demand: 100 + 301 fits 500, 50 + 301 exceeds 250
    assert admission_hook(admit_all, adder, req, False, None) is AddReqResult.CONTINUE
    assert req.abort_messages == []
    assert adder.lightkv_reserved == [401, 250]


def test_pool_check_hook_reports_the_groups_leaks() -> None:
    """The scheduler's leak report gets the later groups' leaks; without layer-group pools it is unchanged."""
    pool, _, cache = build_pools([100, 50, 25], halving_planner)
    checker = SimpleNamespace(req_to_token_pool=pool)
    assert pool_check_hook((False, ["full pool ok"]), checker, None) == (False, ["full pool ok"])
    cache.allocators[1].alloc(3)  # slots no row holds
    has_leak, messages = pool_check_hook((False, ["full pool ok"]), checker, None)
    assert has_leak
    assert messages[0] == "full pool ok"
    assert messages[1:] == cache.leaks() and "layer group 2" in messages[1]
    stock = SimpleNamespace(req_to_token_pool=ReqToTokenPool(2, 8, "cpu", False))
    assert pool_check_hook((True, ["leak"]), stock, None) == (True, ["leak"])


def test_prefill_requests_hook_names_the_rows_requests() -> None:
    """Before ``prepare_for_extend`` the pools learn the batch's requests (without them a new row cannot be
    planned); a stock request pool is left alone."""
    pool, _, cache = build_pools([1000, 500, 250], halving_planner)
    rows = torch.tensor(pool.alloc_rows(2))
    with pytest.raises(RuntimeError, match="starts a prefill without its request"):
        pool.alloc_aux_to_lengths(req_pool_indices_cpu=rows, target_seq_lens_cpu=torch.tensor([40, 80]))
    prefill_requests_hook(SimpleNamespace(req_to_token_pool=pool, reqs=[object(), object()]))
    pool.alloc_aux_to_lengths(req_pool_indices_cpu=rows, target_seq_lens_cpu=torch.tensor([40, 80]))
    assert cache.lengths[:, rows].tolist() == [[20, 40], [10, 20]]
    stock = ReqToTokenPool(2, 8, "cpu", False)
    prefill_requests_hook(SimpleNamespace(req_to_token_pool=stock, reqs=[object()]))
    assert stock._aux_cache is None


@pytest.mark.parametrize("target", [target for target, _, _ in POOL_HOOKS])
def test_pool_hook_targets_exist_in_sglang(target: str) -> None:
    """``HookRegistry.apply_hooks`` only logs a target it cannot resolve, so a renamed SGLang method would
    silently switch the pools' bookkeeping off: resolve each target as it does."""
    owner, name = target.rsplit(".", 1)
    assert callable(getattr(pkgutil.resolve_name(owner), name))
