"""SGLang scheduler hooks (:data:`POOL_HOOKS`): the layer-group pools (:mod:`~lightkv_adapters.sglang.pools`) and
the per-request refusals of compression.

They install the pools, tell them each prefill's requests, admit a request only where every group has room, add
the groups to the scheduler's leak check and report them in ``/server_info``; each does nothing unless the pools
are installed. A request whose prompt compression would change what it asks for (input-token logprobs of a prompt
with images) is refused alone, with the reason. The pools are imported on first use, so SGLang's processes without
a model runner never import them. See the README (SGLang).
"""

from __future__ import annotations

from collections.abc import Callable

from sglang.srt.plugins.hook_registry import HookType

from lightkv_adapters.sglang.settings import settings_of

#: Key of the lightkv state in each scheduler's entry of ``/server_info``'s ``internal_states``.
STATE_KEY = "lightkv"

#: Attribute of SGLang's ``PrefillAdder`` holding, per group (group 0 first), the slots reserved in its pass.
RESERVED_ATTRIBUTE = "lightkv_reserved"

#: Attribute set on a SGLang ``Req`` whose prompt must be prefilled in one piece (it has images and chunked
#: prefill is on): :func:`queued_request_hook` sets it, :func:`admission_hook` honours it.
WHOLE_PREFILL_ATTRIBUTE = "lightkv_whole_prefill"

#: Attribute set on a SGLang ``Req`` (one with images) that must not reuse a prefix of SGLang's radix tree:
#: :func:`queued_request_hook` sets it, :func:`prefix_match_hook` honours it.
NO_PREFIX_ATTRIBUTE = "lightkv_no_prefix"


def install_pools_hook(model_runner: object, *args: object, **kwargs: object) -> None:
    """Before ``ModelRunner._init_post_memory_pool_components``: replace the single KV pool the runner just
    allocated by layer-group pools of the same memory (under ``--kv-compress`` with grouped pools)."""
    settings = settings_of(model_runner.server_args)
    if settings.enabled and settings.grouped_pools:
        from lightkv_adapters.sglang.pools import install_pools

        install_pools(model_runner, settings.pool_ratios)


def prefill_requests_hook(batch: object, *args: object, **kwargs: object) -> None:
    """Before ``ScheduleBatch.prepare_for_extend``: tell the layer-group pools which requests the rows it is
    about to allocate belong to (their plans size each group's slots)."""
    from lightkv_adapters.sglang.group_cache import LayerGroupCache

    cache = getattr(batch.req_to_token_pool, "_aux_cache", None)
    if isinstance(cache, LayerGroupCache):
        cache.expect(batch.reqs)


def admission_hook(original: Callable, adder: object, req: object, *args: object, **kwargs: object) -> object:
    """Around ``PrefillAdder.add_one_req``: a request marked for a whole prefill (:data:`WHOLE_PREFILL_ATTRIBUTE`,
    a prompt with images under chunked prefill) that the pass's chunk budget would split is admitted whole as the
    pass's first request, or left for a later pass where it is first; then :func:`_admit_to_groups`."""
    from sglang.srt.managers.schedule_policy import AddReqResult

    chunk = adder.rem_chunk_tokens
    if _finishing(req) or not getattr(req, WHOLE_PREFILL_ATTRIBUTE, False) or chunk is None:
        return _admit_to_groups(original, adder, req, *args, **kwargs)
    extend = len(req.full_untruncated_fill_ids) - req.prefix_len
    if extend <= chunk:
        return _admit_to_groups(original, adder, req, *args, **kwargs)
    if adder.can_run_list:
        return AddReqResult.OTHER
    adder.rem_chunk_tokens = extend
    try:
        return _admit_to_groups(original, adder, req, *args, **kwargs)
    finally:
        adder.rem_chunk_tokens = chunk - (extend - adder.rem_chunk_tokens)


def _admit_to_groups(original: Callable, adder: object, req: object, *args: object, **kwargs: object) -> object:
    """With layer-group pools a request is admitted only if every group has room for its planned prompt tokens
    and its decode budget (priced together where the groups share an arena), beyond the decode budget of the
    running requests and what this pass already admitted (kept on the adder as :data:`RESERVED_ATTRIBUTE`, per
    group, group 0 first; a decode budget past the empty pools is clipped to them). A request whose prompt could
    never fit is aborted with the reason."""
    groups = getattr(adder.token_to_kv_pool_allocator, "groups", None)
    if groups is None:
        return original(adder, req, *args, **kwargs)
    from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS, AddReqResult

    from lightkv_adapters.sglang.pools import group_demand

    reserved = getattr(adder, RESERVED_ATTRIBUTE, None)
    if reserved is None:
        running = adder.running_batch.reqs if adder.running_batch is not None else []
        decode = int(sum(adder._get_running_request_total_token_offset(r) for r in running))
        reserved = [decode] * (len(groups.allocators) + 1)
        setattr(adder, RESERVED_ATTRIBUTE, reserved)
    aborting = _finishing(req)
    max_new = (
        0 if aborting else min(max(req.sampling_params.max_new_tokens - len(req.output_ids), 0), CLIP_MAX_NEW_TOKENS)
    )
    prompt = group_demand(groups, req, 0)
    refusal = None if aborting else groups.refusal(prompt)
    if refusal is not None:
        # SGLang's own aborts replace the prompt by a stub at the next pass, which this hook then admits.
        req.set_finish_with_abort(refusal)
        return AddReqResult.CONTINUE
    demand = groups.clip(prompt, max_new)
    if not groups.make_room(demand, reserved, adder.tree_cache):
        return AddReqResult.NO_TOKEN
    admitted = len(adder.can_run_list)
    result = original(adder, req, *args, **kwargs)
    if len(adder.can_run_list) > admitted:
        reserved[:] = [held + need for held, need in zip(reserved, demand, strict=True)]
    return result


def queued_request_hook(scheduler: object, req: object, *args: object, **kwargs: object) -> None:
    """Before ``Scheduler._add_request_to_queue``, under ``--kv-compress``, for a request with images:

    * if it asks for input-token logprobs (``logprob_start_len`` inside its prompt), it is finished with an abort
      naming why: its vision tokens are merged or dropped during the prefill, so most of the prompt's logprobs do
      not exist. Text-only requests and output logprobs are served as usual;
    * it stays out of SGLang's radix tree both ways: its KV after the first reduce layer depends on its whole
      prompt, so nothing of it is inserted (SGLang's ``skip_radix_cache_insert``) and it matches no cached prefix
      (:data:`NO_PREFIX_ATTRIBUTE`, :func:`prefix_match_hook`), since every reduce layer must see its whole
      prompt. Text-only requests share prefixes as usual;
    * under chunked prefill it is marked for a whole prefill (:data:`WHOLE_PREFILL_ATTRIBUTE`: every reduce layer
      must see the whole prompt), or, if longer than ``--max-prefill-tokens``, finished with an abort saying so.
      Text-only requests are chunked as usual."""
    settings = settings_of(scheduler.server_args)
    if not settings.enabled or _finishing(req) or req.multimodal_inputs is None:
        return
    if req.return_logprob and 0 <= req.logprob_start_len < len(req.origin_input_ids):
        start = req.logprob_start_len
        req.logprob_start_len = -1
        req.set_finish_with_abort(
            f"lightkv: input-token logprobs (logprob_start_len={start}) of a prompt with images are not available "
            f"under --kv-compress {settings.method}: its vision tokens are merged or dropped during the prefill; "
            "ask for output logprobs only (leave logprob_start_len unset), or use a server without --kv-compress"
        )
        return
    req.skip_radix_cache_insert = True
    setattr(req, NO_PREFIX_ATTRIBUTE, True)
    if scheduler.chunked_prefill_size is None or scheduler.chunked_prefill_size <= 0:
        return
    if len(req.origin_input_ids) > scheduler.max_prefill_tokens:
        req.set_finish_with_abort(
            f"lightkv: this prompt with images has {len(req.origin_input_ids)} tokens; under --kv-compress "
            f"{settings.method} a prompt with images is prefilled in one piece (chunked prefill would hide part of "
            f"it from the reduce layers), up to --max-prefill-tokens ({scheduler.max_prefill_tokens}); raise "
            "--max-prefill-tokens or send fewer or smaller images"
        )
        return
    setattr(req, WHOLE_PREFILL_ATTRIBUTE, True)


def prefix_match_hook(
    original: Callable, tree_cache: object, params: object, *args: object, **kwargs: object
) -> object:
    """Around ``UnifiedRadixCache.match_prefix``: a request marked :data:`NO_PREFIX_ATTRIBUTE` gets a miss (SGLang's
    own ``zero_match_result``); every other lookup is SGLang's."""
    result = original(tree_cache, params, *args, **kwargs)
    req = getattr(params, "req", None)
    if req is None or not getattr(req, NO_PREFIX_ATTRIBUTE, False):
        return result
    from sglang.srt.mem_cache.base_prefix_cache import zero_match_result

    return zero_match_result(tree_cache, result, extra_key=req.extra_key)


def _finishing(req: object) -> bool:
    """Whether SGLang's ``req`` has finished or is being aborted."""
    return req.finished_reason is not None or getattr(req, "to_finish", None) is not None


def failed_requests_hook(scheduler: object, batch: object, *args: object, **kwargs: object) -> None:
    """Before ``Scheduler.process_batch_result``: the requests of a prefill whose compression failed
    (:mod:`~lightkv_adapters.sglang.failures`) finish with an abort (HTTP 500, the reason as message) instead of
    their first token; SGLang then releases their slots as for any aborted request. It runs after every forward of
    every server with the plugin installed, so it returns at once while no failure is recorded."""
    from lightkv_adapters.sglang import failures

    if not failures.pending():
        return
    from http import HTTPStatus

    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    for req in batch.reqs:
        message = failures.take(req.rid)
        if message is not None:
            req.to_finish = FINISH_ABORT(message, HTTPStatus.INTERNAL_SERVER_ERROR, "InternalServerError")


def pool_state_hook(result: object, controller: object, *args: object, **kwargs: object) -> object:
    """After ``SchedulerInternalStateController.get_internal_state``: adds :data:`STATE_KEY` to the state
    ``/server_info`` returns: the ``--kv-compress`` method, per layer group its pool's ``size`` and ``free`` slots
    (group 0 is SGLang's own pool; one group without layer-group pools; in a shared arena both count every page)
    and, where the groups share an arena, its ``pages``, ``free_pages`` and ``rows_per_page``."""
    scheduler = controller.scheduler
    allocator = scheduler.token_to_kv_pool_allocator
    pools = [{"size": int(allocator.size), "free": int(allocator.available_size())}]
    groups = getattr(allocator, "groups", None)
    state = {"kv_compress": settings_of(scheduler.server_args).method, "pools": pools}
    if groups is not None:
        pools += groups.state()
        if groups.arena is not None:
            state["arena"] = groups.arena.state()
    result.internal_state[STATE_KEY] = state
    return result


def pool_check_hook(result: tuple, checker: object, *args: object, **kwargs: object) -> tuple:
    """After ``SchedulerInvariantChecker._check_all_pools``: the layer-group pools' own conservation check
    (every slot free, held by exactly one row, or partnered with a group-0 slot) joins the scheduler's leak report.
    In a shared arena SGLang's check of group 0 (free + cached + held slots == the arena's group-0 slots) is redone
    counting the pages the later groups hold as held: they are no leak of group 0."""
    cache = getattr(checker.req_to_token_pool, "_aux_cache", None)
    leaks = getattr(cache, "leaks", None)
    if leaks is None:
        return result
    problems = leaks()
    has_leak, messages = result
    if cache.arena is not None and messages:
        pool_stats, *rest = args
        uncached = kwargs.get("uncached", rest[0] if rest else 0)
        elsewhere = cache.arena.slots_held_elsewhere(0)
        has_leak, first = checker._check_full_pool(pool_stats, uncached=uncached + elsewhere)
        messages = [f"{first}, held by the later layer groups' pages={elsewhere}", *messages[1:]]
    return has_leak or bool(problems), [*messages, *problems]


#: ``(target, hook, kind)`` of the scheduler hooks, for SGLang's ``HookRegistry``.
POOL_HOOKS = (
    (
        "sglang.srt.model_executor.model_runner.ModelRunner._init_post_memory_pool_components",
        install_pools_hook,
        HookType.BEFORE,
    ),
    ("sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend", prefill_requests_hook, HookType.BEFORE),
    ("sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req", admission_hook, HookType.AROUND),
    (
        "sglang.srt.managers.scheduler_components.invariant_checker.SchedulerInvariantChecker._check_all_pools",
        pool_check_hook,
        HookType.AFTER,
    ),
    ("sglang.srt.managers.scheduler.Scheduler._add_request_to_queue", queued_request_hook, HookType.BEFORE),
    ("sglang.srt.mem_cache.unified_radix_cache.UnifiedRadixCache.match_prefix", prefix_match_hook, HookType.AROUND),
    ("sglang.srt.managers.scheduler.Scheduler.process_batch_result", failed_requests_hook, HookType.BEFORE),
    (
        "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state",
        pool_state_hook,
        HookType.AFTER,
    ),
)
