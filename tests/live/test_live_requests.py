"""Every request feature a client sends, on live servers with and without compression: output and top logprobs,
input-token logprobs (served for text, refused for a compressed prompt with images, never a crash), streaming,
``n > 1``, stop strings, several images, text only, ``max_tokens`` 1, and an image too large for a layer group's
pool (refused alone; the server keeps serving). After each test the server still answers and every pool is free.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
from helpers.live_checks import assert_pools_free, assert_serving, pool_state, refused_chat
from helpers.live_requests import CORRECTNESS_PROMPTS, Prompt

pytestmark = pytest.mark.live_server

ALL = ["qwen-none", "qwen-lightkv", "qwen-fastv", "llava-none", "llava-lightkv", "llava-fastv"]
COMPRESSED = ["qwen-lightkv", "qwen-fastv", "llava-lightkv", "llava-fastv"]


def image_prompt(live) -> Prompt:
    return CORRECTNESS_PROMPTS[live.config.family][0]


def text_prompt(live) -> Prompt:
    return CORRECTNESS_PROMPTS[live.config.family][2]


@pytest.mark.parametrize("live", ALL, indirect=True)
def test_server_info_reports_the_pools(live):
    state = pool_state(live)
    assert state["kv_compress"] == live.config.method
    groups = {"none": 1, "fastv": 2, "lightkv": 4}[live.config.method]
    assert len(state["pools"]) == groups
    # compressed servers share one arena of pages between their layer groups unless given fixed pool ratios
    shared = live.config.method != "none" and "--kv-compress-pool-ratios" not in live.config.args
    assert ("arena" in state) == shared, state
    if shared:
        assert state["arena"]["pages"] > 0 and state["arena"]["rows_per_page"] > 0
    assert_pools_free(live)


@pytest.mark.parametrize("live", COMPRESSED, indirect=True)
def test_input_logprobs_of_a_compressed_prompt_are_refused_per_request(live):
    tokenizer = live.tokenizer
    body = image_prompt(live).generate(tokenizer, return_logprob=True, logprob_start_len=0)
    status, out = live.server.post("/generate", body)
    assert status == 400, out
    message = out["error"]["message"] if isinstance(out, dict) and "error" in out else str(out)
    assert "input-token logprobs" in message and f"--kv-compress {live.config.method}" in message, message
    # a text-only prompt is not compressed: its input logprobs are served
    status, out = live.server.post("/generate", text_prompt(live).generate(tokenizer, return_logprob=True,
                                                                            logprob_start_len=0))  # fmt: skip
    assert status == 200, out
    assert len(out["meta_info"]["input_token_logprobs"]) == out["meta_info"]["prompt_tokens"]
    assert_serving(live)


@pytest.mark.parametrize("live", ["qwen-none", "llava-none"], indirect=True)
def test_input_logprobs_on_a_stock_server(live):
    body = image_prompt(live).generate(live.tokenizer, return_logprob=True, logprob_start_len=0)
    status, out = live.server.post("/generate", body)
    assert status == 200, out
    assert len(out["meta_info"]["input_token_logprobs"]) == out["meta_info"]["prompt_tokens"]


@pytest.mark.parametrize("live", ALL, indirect=True)
def test_streaming_equals_the_whole_answer(live):
    prompt = image_prompt(live)
    whole = live.server.post("/v1/chat/completions", prompt.chat())[1]["choices"][0]["message"]["content"]
    chunks = list(stream(live, prompt.chat(stream=True)))
    assert chunks[-1] == "[DONE]"
    pieces = [json.loads(chunk) for chunk in chunks[:-1]]
    text = "".join(piece["choices"][0]["delta"].get("content") or "" for piece in pieces if piece["choices"])
    assert text == whole
    finish = [piece["choices"][0]["finish_reason"] for piece in pieces if piece["choices"]]
    assert finish[-1] == "length"
    assert_pools_free(live)


def stream(live, body: dict):
    """The ``data:`` payloads of a streamed chat completion."""
    request = urllib.request.Request(
        live.server.base_url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        for line in response:
            line = line.decode().strip()
            if line.startswith("data:"):
                yield line.removeprefix("data:").strip()


@pytest.mark.parametrize("live", ALL, indirect=True)
def test_several_choices(live):
    prompt = image_prompt(live)
    status, out = live.server.post("/v1/chat/completions", prompt.chat(n=2))
    assert status == 200, out
    greedy = [choice["message"]["content"] for choice in out["choices"]]
    assert len(greedy) == 2 and greedy[0] == greedy[1]
    status, out = live.server.post("/v1/chat/completions", prompt.chat(n=3, temperature=1.0, seed=7))
    assert status == 200, out
    assert [choice["index"] for choice in out["choices"]] == [0, 1, 2]
    assert all(choice["finish_reason"] in ("length", "stop") for choice in out["choices"])
    assert out["usage"]["completion_tokens"] <= 3 * prompt.max_tokens
    assert_pools_free(live)


@pytest.mark.parametrize("live", ALL, indirect=True)
def test_stop_strings_and_stop_tokens(live):
    """Each stop cuts the server's own unstopped greedy answer (32 tokens) where it first occurs."""
    prompt = image_prompt(live)
    body = prompt.generate(live.tokenizer)
    body["sampling_params"]["max_new_tokens"] = 32
    status, out = live.server.post("/generate", body)
    assert status == 200, out
    tokens = out["output_ids"]
    # a stop token: the answer ends at its first occurrence, the token included
    body["sampling_params"]["stop_token_ids"] = [tokens[2]]
    status, out = live.server.post("/generate", body)
    assert status == 200, out
    assert out["output_ids"] == tokens[: tokens.index(tokens[2]) + 1]
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    # a stop string: a plain character of the chat answer, which is cut before its first occurrence
    status, out = live.server.post("/v1/chat/completions", prompt.chat(max_tokens=32))
    assert status == 200, out
    text = out["choices"][0]["message"]["content"]
    stop = next(char for char in text[1:] if char.isascii() and char.isprintable() and not char.isspace())
    status, out = live.server.post("/v1/chat/completions", prompt.chat(max_tokens=32, stop=[stop]))
    assert status == 200, out
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == text[: text.index(stop)]
    assert_pools_free(live)


@pytest.mark.parametrize("live", ALL, indirect=True)
def test_one_token(live):
    status, out = live.server.post("/v1/chat/completions", image_prompt(live).chat(max_tokens=1, logprobs=True))
    assert status == 200, out
    choice = out["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["logprobs"]["content"]) == 1
    assert choice["logprobs"]["content"][0]["logprob"] == pytest.approx(live.reference()[0]["logprobs"][0], abs=1e-3)
    assert_pools_free(live)


@pytest.mark.parametrize("live", ["llava-lightkv"], indirect=True)
def test_a_prompt_too_large_for_a_layer_group_is_refused_alone(live):
    """``llava-lightkv`` runs with a last layer group of 159 slots: six images plan more than that there."""
    big = Prompt("Describe every picture.", tuple((48, 48, 10 + i) for i in range(6)))
    message = refused_chat(live, big)
    assert "layer groups" in message and "--kv-compress-pool-ratios" in message, message
    assert_serving(live)
