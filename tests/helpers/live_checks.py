"""Checks the live-server tests share: the server still serves, and its KV pools are back at their free count."""

from __future__ import annotations

import json
import time

from helpers.live_requests import CORRECTNESS_PROMPTS

#: Seconds a server gets to release the slots of requests that just ended (aborts and disconnects included).
RELEASE_TIMEOUT_S = 60


def pool_state(live) -> dict:
    """The lightkv entry of ``/server_info``: ``kv_compress`` and, per layer group, its pool's ``size``/``free``."""
    status, info = live.server.get("/server_info")
    assert status == 200, info
    return info["internal_states"][0]["lightkv"]


def all_free(state: dict) -> bool:
    """Every pool at its size and, where the groups share an arena of pages, every page free."""
    arena = state.get("arena", {"pages": 0, "free_pages": 0})
    return all(pool["free"] == pool["size"] for pool in state["pools"]) and arena["free_pages"] == arena["pages"]


def assert_pools_free(live) -> None:
    state = pool_state(live)
    assert all_free(state), state


def flush_radix_cache(live) -> None:
    """SGLang's radix cache emptied (``/flush_cache``, which waits until no request runs); nothing to do on a
    server without it."""
    if not live.config.radix_cache:
        return
    status, out = live.server.post(f"/flush_cache?timeout={RELEASE_TIMEOUT_S}", {})
    assert status == 200, out


def wait_pools_free(live) -> list[dict]:
    """Every pool back at its free count within :data:`RELEASE_TIMEOUT_S` (with the radix cache on, once the
    cache is flushed: it keeps text-only prompts); returns the pools."""
    flush_radix_cache(live)
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    while True:
        state = pool_state(live)
        if all_free(state):
            return state["pools"]
        assert time.monotonic() < deadline, f"pools not free {RELEASE_TIMEOUT_S} s after the requests ended: {state}"
        time.sleep(0.5)


def assert_serving(live) -> None:
    """The server answers the family's one-image request as the Transformers adapter does, and every pool is
    back at its free count."""
    prompt = CORRECTNESS_PROMPTS[live.config.family][0]
    status, out = live.server.post("/generate", prompt.generate(live.tokenizer))
    assert status == 200, out
    assert out["output_ids"] == live.reference()[0]["tokens"]
    wait_pools_free(live)


def refused_chat(live, prompt) -> str:
    """The one-line reason a chat request of ``prompt`` is refused with (HTTP 400)."""
    status, out = live.server.post("/v1/chat/completions", prompt.chat())
    assert status == 400, out
    return out["message"] if "message" in out else json.dumps(out)
