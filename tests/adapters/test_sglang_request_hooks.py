"""The SGLang plugin's per-request hooks (``lightkv_adapters.sglang.admission``) at unit level: input-token
logprobs of a compressed prompt refused for that request alone, a prefill whose compression failed turned into
aborts of its requests (``lightkv_adapters.sglang.failures``), and the pools reported in ``/server_info``. The live
suite (tests/live/) runs the same paths in real servers.
"""

from __future__ import annotations

import importlib.util
from http import HTTPStatus
from types import SimpleNamespace

import pytest
import torch

if importlib.util.find_spec("sglang") is None:
    pytest.skip("SGLang is not installed", allow_module_level=True)

from lightkv_adapters.sglang import cpu_env  # noqa: E402

cpu_env.install()

from helpers.sglang_pools import build_pools, halving_planner  # noqa: E402
from sglang.srt.managers.schedule_batch import FINISH_ABORT  # noqa: E402

from lightkv_adapters.sglang import failures  # noqa: E402
from lightkv_adapters.sglang.admission import (  # noqa: E402
    STATE_KEY,
    WHOLE_PREFILL_ATTRIBUTE,
    failed_requests_hook,
    pool_state_hook,
    queued_request_hook,
)
from lightkv_adapters.sglang.settings import SETTINGS_ATTRIBUTE, KVCompressSettings  # noqa: E402


class Req(SimpleNamespace):
    """The parts of SGLang's ``Req`` the hooks read; ``set_finish_with_abort`` records its message."""

    def set_finish_with_abort(self, message: str) -> None:
        self.aborted = message


def make_req(**fields) -> Req:
    values = dict(
        rid="r",
        finished_reason=None,
        to_finish=None,
        return_logprob=True,
        logprob_start_len=0,
        origin_input_ids=[1] * 10,
        multimodal_inputs=object(),
        aborted=None,
    )
    values.update(fields)
    return Req(**values)


def scheduler(method: str, chunked_prefill_size: int | None = None, max_prefill_tokens: int = 16384) -> SimpleNamespace:
    server_args = SimpleNamespace(**{SETTINGS_ATTRIBUTE: KVCompressSettings(method=method)})
    return SimpleNamespace(
        server_args=server_args, chunked_prefill_size=chunked_prefill_size, max_prefill_tokens=max_prefill_tokens
    )


@pytest.mark.parametrize("method", ["lightkv", "fastv"])
def test_input_logprobs_of_a_prompt_with_images_are_refused(method):
    for start in (0, 5, 9):
        req = make_req(logprob_start_len=start)
        queued_request_hook(scheduler(method), req)
        assert req.aborted is not None and f"logprob_start_len={start}" in req.aborted
        assert f"--kv-compress {method}" in req.aborted
        assert req.logprob_start_len == -1


@pytest.mark.parametrize(
    ("method", "fields"),
    [
        ("none", {}),  # a stock server serves them
        ("lightkv", {"multimodal_inputs": None}),  # a text-only prompt is not compressed
        ("lightkv", {"logprob_start_len": 10}),  # output logprobs only (SGLang's default start)
        ("lightkv", {"logprob_start_len": -1}),
        ("lightkv", {"return_logprob": False}),
        ("lightkv", {"finished_reason": "already aborted"}),
        ("lightkv", {"to_finish": "aborting"}),
    ],
)
def test_other_logprob_requests_pass(method, fields):
    req = make_req(**fields)
    start = req.logprob_start_len
    queued_request_hook(scheduler(method), req)
    assert req.aborted is None and req.logprob_start_len == start


@pytest.mark.parametrize("method", ["lightkv", "fastv"])
def test_prompts_with_images_are_marked_for_a_whole_prefill_under_chunked_prefill(method):
    """Under chunked prefill a prompt with images up to ``--max-prefill-tokens`` is marked to be prefilled in one
    piece; a longer one is refused alone, naming the flag; text-only prompts and stock servers are left alone, and
    without chunked prefill nothing is marked."""
    req = make_req(return_logprob=False, origin_input_ids=[1] * 100)
    queued_request_hook(scheduler(method, chunked_prefill_size=8), req)
    assert req.aborted is None and getattr(req, WHOLE_PREFILL_ATTRIBUTE)
    long = make_req(return_logprob=False, origin_input_ids=[1] * 101)
    queued_request_hook(scheduler(method, chunked_prefill_size=8, max_prefill_tokens=100), long)
    assert "101 tokens" in long.aborted and "--max-prefill-tokens (100)" in long.aborted
    assert not hasattr(long, WHOLE_PREFILL_ATTRIBUTE)
    for server, fields in (
        (scheduler(method, chunked_prefill_size=8), {"multimodal_inputs": None}),
        (scheduler("none", chunked_prefill_size=8), {}),
        (scheduler(method, chunked_prefill_size=None), {}),
        (scheduler(method, chunked_prefill_size=-1), {}),
    ):
        req = make_req(return_logprob=False, **fields)
        queued_request_hook(server, req)
        assert req.aborted is None and not hasattr(req, WHOLE_PREFILL_ATTRIBUTE)


def test_a_failed_prefill_aborts_exactly_its_requests():
    hidden = torch.randn(7, 4)
    out = failures.fail_batch(hidden, ["a", "b"], ValueError("bad grid"))
    assert out.shape == hidden.shape and not out.any()
    batch = SimpleNamespace(reqs=[make_req(rid="a"), make_req(rid="b"), make_req(rid="c")])
    failed_requests_hook(scheduler("lightkv"), batch)
    for req in batch.reqs[:2]:
        assert isinstance(req.to_finish, FINISH_ABORT)
        assert req.to_finish.status_code == HTTPStatus.INTERNAL_SERVER_ERROR
        assert "ValueError: bad grid" in req.to_finish.message
    assert batch.reqs[2].to_finish is None
    # recorded once: the next batch of the same requests (none) is not aborted again
    again = SimpleNamespace(reqs=[make_req(rid="a")])
    failed_requests_hook(scheduler("lightkv"), again)
    assert again.reqs[0].to_finish is None


def test_server_info_reports_every_group():
    _, allocator, cache = build_pools((64, 32, 16), halving_planner)
    controller = SimpleNamespace(
        scheduler=SimpleNamespace(token_to_kv_pool_allocator=allocator, server_args=scheduler("lightkv").server_args)
    )
    state = pool_state_hook(SimpleNamespace(internal_state={}), controller).internal_state[STATE_KEY]
    assert state == {
        "kv_compress": "lightkv",
        "pools": [{"size": 64, "free": 64}, {"size": 32, "free": 32}, {"size": 16, "free": 16}],
    }
    taken = cache.allocators[1].alloc(5)
    state = pool_state_hook(SimpleNamespace(internal_state={}), controller).internal_state[STATE_KEY]
    assert state["pools"][2] == {"size": 16, "free": 11}
    cache.allocators[1].free(taken)
    plain = SimpleNamespace(size=128, available_size=lambda: 128)
    controller.scheduler.token_to_kv_pool_allocator = plain
    state = pool_state_hook(SimpleNamespace(internal_state={}), controller).internal_state[STATE_KEY]
    assert state["pools"] == [{"size": 128, "free": 128}]
