"""The SGLang plugin's scheduler hooks on layer-group KV pools (``lightkv_adapters.sglang.admission``), on
SGLang's real classes (CPU): the admission hook reserving every group's room (and aborting what no group can
ever hold), the leak report, the prefill's requests handed to the pools, and every hook target resolving in SGLang.
"""

from __future__ import annotations

import importlib.util
import pkgutil
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

if importlib.util.find_spec("sglang") is None:
    pytest.skip("SGLang is not installed", allow_module_level=True)

from lightkv_adapters.sglang import cpu_env  # noqa: E402

cpu_env.install()

from helpers.sglang_pools import build_arena, build_pools, halving_planner  # noqa: E402
from sglang.srt.managers.schedule_policy import AddReqResult  # noqa: E402
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool  # noqa: E402

from lightkv_adapters.sglang.admission import (  # noqa: E402
    POOL_HOOKS,
    WHOLE_PREFILL_ATTRIBUTE,
    admission_hook,
    pool_check_hook,
    prefill_requests_hook,
)
from lightkv_adapters.sglang.arena import PageArena  # noqa: E402
from lightkv_core.plan import LengthPlan  # noqa: E402

# --- fake scheduler parts ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class HookReq:
    """The parts of SGLang's ``Req`` the admission hook reads; ``set_finish_with_abort`` records its message."""

    full_untruncated_fill_ids: range
    sampling_params: SimpleNamespace
    output_ids: list[int] = field(default_factory=list)
    prefix_len: int = 0
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
    rem_chunk_tokens: int | None = None
    tree_cache: object | None = None  # SGLang's radix tree (None: no prefix cache to evict from)

    def _get_running_request_total_token_offset(self, req: HookReq) -> int:
        """Tokens a running request may still decode (SGLang scales them by its decode-ratio estimate)."""
        return req.sampling_params.max_new_tokens - len(req.output_ids)


def admit_all(adder: FakeAdder, req: HookReq, *args: object, **kwargs: object) -> AddReqResult:
    """SGLang's ``add_one_req`` with room for everything."""
    adder.can_run_list.append(req)
    return AddReqResult.CONTINUE


def admit_chunked(adder: FakeAdder, req: HookReq, *args: object, **kwargs: object) -> AddReqResult:
    """SGLang's ``add_one_req`` under chunked prefill: the request's prompt (or the part the pass's chunk budget
    leaves room for) joins the batch and is charged to that budget; a spent budget admits nothing."""
    if adder.rem_chunk_tokens <= 0:
        return AddReqResult.OTHER
    extend = min(len(req.full_untruncated_fill_ids) - req.prefix_len, adder.rem_chunk_tokens)
    adder.can_run_list.append((req, extend))
    adder.rem_chunk_tokens -= extend
    return AddReqResult.CONTINUE


def admit_none(adder: FakeAdder, req: HookReq, *args: object, **kwargs: object) -> AddReqResult:
    """SGLang's ``add_one_req`` turning the request down for its own reasons."""
    return AddReqResult.OTHER


# --- hooks ---------------------------------------------------------------------------------------------------------


def test_admission_reserves_every_group_until_one_is_full() -> None:
    """Each admitted request reserves its planned tokens, decode budget and a spare slot in every later group,
    on top of the running requests' decode budget; a request a group cannot take gets ``NO_TOKEN`` without
    reaching SGLang's own check."""
    _, allocator, _ = build_pools([1000, 500, 250], halving_planner)
    running = SimpleNamespace(reqs=[HookReq.of(100, 12, generated=2)])
    adder = FakeAdder(allocator, running)
    req = HookReq.of(200, 20)  # demand: 200 + 21, 100 + 21 and 50 + 21
    for admitted in range(1, 4):
        assert admission_hook(admit_all, adder, req, False, None) is AddReqResult.CONTINUE
        assert adder.lightkv_reserved == [10 + 221 * admitted, 10 + 121 * admitted, 10 + 71 * admitted]
    # group 2 has 250 - 223 = 27 slots left for a demand of 71
    assert admission_hook(admit_all, adder, req, False, None) is AddReqResult.NO_TOKEN
    assert len(adder.can_run_list) == 3
    assert adder.lightkv_reserved == [673, 373, 223]
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
    assert adder.lightkv_reserved == [101, 51, 26]


def test_admission_declined_by_sglang_reserves_nothing() -> None:
    """A request SGLang's own check turns down reserves no slots in the later groups."""
    _, allocator, _ = build_pools([1000, 500, 250], halving_planner)
    adder = FakeAdder(allocator)
    assert admission_hook(admit_none, adder, HookReq.of(200, 20), False, None) is AddReqResult.OTHER
    assert adder.lightkv_reserved == [0, 0, 0]


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
    assert adder.lightkv_reserved == [0, 0, 0]


def test_admission_clips_a_decode_budget_past_a_group_to_the_pool() -> None:
    """A prompt that fits with a decode budget past a group's whole pool is admitted, its demand clipped."""
    _, allocator, _ = build_pools([1000, 500, 250], halving_planner)
    adder = FakeAdder(allocator)
    req = HookReq.of(200, 300)  # demand: 100 + 301 fits 500, 50 + 301 exceeds 250
    assert admission_hook(admit_all, adder, req, False, None) is AddReqResult.CONTINUE
    assert req.abort_messages == []
    assert adder.lightkv_reserved == [501, 401, 250]


# --- the shared arena: 4-, 2- and 2-layer groups, 64-row pages of 16, 32 and 32 tokens --------------------------------


def test_arena_admission_prices_the_groups_together() -> None:
    """In an arena a request is admitted while the pages its groups would take (beyond their free slots) are
    free, its own decode budget and the running requests' included; group 0 counts too."""
    _, allocator, _ = build_arena(PageArena(21, [4, 2, 2], 64), halving_planner)
    adder = FakeAdder(allocator)
    req = HookReq.of(200, 13)  # demand 214, 114, 64 slots: 14 + 4 + 2 pages, the whole arena
    assert admission_hook(admit_all, adder, req, False, None) is AddReqResult.CONTINUE
    assert adder.lightkv_reserved == [214, 114, 64]
    assert admission_hook(admit_all, adder, req, False, None) is AddReqResult.NO_TOKEN
    assert (
        admission_hook(admit_all, adder, HookReq.of(8, 0), False, None) is AddReqResult.NO_TOKEN
    )  # 1 + 1 + 1 > 20 - 21
    assert len(adder.can_run_list) == 1


def test_arena_admission_holds_text_requests_as_one_pool_does() -> None:
    """Text-only requests (a slot per token in every group) fill the arena as far as one pool of its memory: 20
    pages of 64 rows are 160 tokens of all 8 layers, less rounding to whole pages."""
    flat = lambda req, seq_len: LengthPlan.exactly((seq_len, seq_len, seq_len))  # noqa: E731
    _, allocator, cache = build_arena(PageArena(21, [4, 2, 2], 64), flat)
    adder = FakeAdder(allocator)
    while admission_hook(admit_all, adder, HookReq.of(15, 0), False, None) is AddReqResult.CONTINUE:
        pass
    assert len(adder.can_run_list) == 10  # 160 tokens in all, 16 per request
    assert cache.arena.text_capacity() == 160


def test_arena_admission_aborts_a_prompt_the_empty_arena_cannot_hold() -> None:
    """A prompt past the whole arena is aborted with the pages it needs and the flags that give more memory."""
    _, allocator, _ = build_arena(PageArena(21, [4, 2, 2], 64), halving_planner)
    adder = FakeAdder(allocator)
    req = HookReq.of(300, 0)  # 301, 151, 76 slots: 19 + 5 + 3 = 27 pages of 20
    assert admission_hook(admit_all, adder, req, False, None) is AddReqResult.CONTINUE
    (message,) = req.abort_messages
    assert "[301, 151, 76]" in message and "27 pages" in message and "holds 20" in message
    assert "--mem-fraction-static" in message


def test_arena_admission_clips_a_decode_budget_past_the_arena() -> None:
    """A decode budget past the empty arena is clipped to the largest one the arena holds with the prompt."""
    _, allocator, _ = build_arena(PageArena(21, [4, 2, 2], 64), halving_planner)
    adder = FakeAdder(allocator)
    req = HookReq.of(200, 10**4)
    assert admission_hook(admit_all, adder, req, False, None) is AddReqResult.CONTINUE
    demand = adder.lightkv_reserved
    assert sum(-(-n // per_page) for n, per_page in zip(demand, (16, 32, 32), strict=True)) <= 20
    assert sum(-(-(n + 1) // per_page) for n, per_page in zip(demand, (16, 32, 32), strict=True)) > 20
    assert demand[0] - 201 == demand[1] - 101 == demand[2] - 51 > 0


def whole(prompt: int) -> HookReq:
    req = HookReq.of(prompt, 4)
    setattr(req, WHOLE_PREFILL_ATTRIBUTE, True)
    return req


def test_a_prompt_with_images_is_admitted_whole_as_the_first_of_a_pass() -> None:
    """Under chunked prefill (a chunk budget of 100 tokens) a prompt marked for a whole prefill and longer than
    the budget joins an empty batch whole, which spends the budget; in a batch that already holds requests it
    waits for a later pass. Unmarked (text-only) prompts are chunked as usual, and marked ones that fit the budget
    are admitted as any other."""
    adder = FakeAdder(SimpleNamespace(groups=None), rem_chunk_tokens=100)
    assert admission_hook(admit_chunked, adder, whole(250), False, None) is AddReqResult.CONTINUE
    assert [extend for _, extend in adder.can_run_list] == [250] and adder.rem_chunk_tokens == -150
    assert admission_hook(admit_chunked, adder, HookReq.of(50, 4), False, None) is AddReqResult.OTHER

    adder = FakeAdder(SimpleNamespace(groups=None), rem_chunk_tokens=100)
    assert admission_hook(admit_chunked, adder, whole(60), False, None) is AddReqResult.CONTINUE
    assert admission_hook(admit_chunked, adder, whole(250), False, None) is AddReqResult.OTHER
    assert admission_hook(admit_chunked, adder, HookReq.of(250, 4), False, None) is AddReqResult.CONTINUE
    assert [extend for _, extend in adder.can_run_list] == [60, 40] and adder.rem_chunk_tokens == 0


def test_a_whole_prefill_the_pools_turn_down_leaves_the_chunk_budget_as_it_was() -> None:
    """A marked prompt that the layer groups have no room for is not admitted, and the pass's chunk budget is
    restored for the requests after it."""
    _, allocator, _ = build_pools([1000, 500, 250], halving_planner)
    running = SimpleNamespace(reqs=[HookReq.of(100, 300)])  # may decode 300 more tokens in every group
    adder = FakeAdder(allocator, running, rem_chunk_tokens=100)
    assert admission_hook(admit_chunked, adder, whole(1200), False, None) is AddReqResult.CONTINUE  # aborted
    assert adder.rem_chunk_tokens == 100
    assert admission_hook(admit_chunked, adder, whole(600), False, None) is AddReqResult.NO_TOKEN  # 305 + 300 > 500
    assert adder.rem_chunk_tokens == 100 and adder.can_run_list == []


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
