"""Checks the live-server tests share: the server still serves, and its KV pools are back at their free count."""

from __future__ import annotations

import time

from helpers.live_requests import CORRECTNESS_PROMPTS

#: Seconds a server gets to release the slots of requests that just ended (aborts and disconnects included).
RELEASE_TIMEOUT_S = 60


def pool_state(live) -> dict:
    """The lightkv entry of ``/server_info``: ``kv_compress`` and, per layer group, its pool's ``size``/``free``."""
    status, info = live.server.get("/server_info")
    assert status == 200, info
    return info["internal_states"][0]["lightkv"]


def assert_pools_free(live) -> None:
    pools = pool_state(live)["pools"]
    assert all(pool["free"] == pool["size"] for pool in pools), pools


def wait_pools_free(live) -> list[dict]:
    """Every pool back at its free count within :data:`RELEASE_TIMEOUT_S`; returns the pools."""
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    while True:
        pools = pool_state(live)["pools"]
        if all(pool["free"] == pool["size"] for pool in pools):
            return pools
        assert time.monotonic() < deadline, f"pools not free {RELEASE_TIMEOUT_S} s after the requests ended: {pools}"
        time.sleep(0.5)


def assert_serving(live) -> None:
    """The server answers the family's one-image request as the Transformers adapter does, and every pool is
    back at its free count."""
    prompt = CORRECTNESS_PROMPTS[live.config.family][0]
    status, out = live.server.post("/generate", prompt.generate(live.tokenizer))
    assert status == 200, out
    assert out["output_ids"] == live.reference()[0]["tokens"]
    wait_pools_free(live)
