"""Live servers answer as the Transformers adapter does: the same weights, prompts and images give the same greedy
tokens and logprobs, under ``none``, ``lightkv`` and ``fastv``, through ``/generate`` and ``/v1/chat/completions``,
for Qwen2.5-VL and LLaVA-1.5.

Tolerance: tokens exactly; logprobs within :data:`LOGPROB_ATOL`. Both sides compute in float32 on the CPU but with
different kernels (SGLang's torch-native attention over its KV pool, Transformers' SDPA over a padded batch), so
they agree to float32 rounding accumulated over 8 layers and the vision tower: about 1e-5 here. 1e-3 is a hundred
times that, and far below the gap between a merged and an unmerged prompt (whole tokens change, see the method
tests), so it cannot hide a wrong merge.
"""

from __future__ import annotations

import pytest
from helpers.live_requests import CORRECTNESS_PROMPTS

pytestmark = pytest.mark.live_server

LOGPROB_ATOL = 1e-3
BASE = ["qwen-none", "qwen-lightkv", "qwen-fastv", "llava-none", "llava-lightkv", "llava-fastv"]
#: the production settings answer through ``/generate``; the chat route is the same code after the request is parsed
ALL = [*BASE, "qwen-radix", "qwen-overlap", "qwen-tp2", "qwen-triton"]


@pytest.mark.parametrize("live", ALL, indirect=True)
def test_generate_equals_transformers(live):
    tokenizer = live.tokenizer
    for prompt, expected in zip(CORRECTNESS_PROMPTS[live.config.family], live.reference(), strict=True):
        status, out = live.server.post("/generate", prompt.generate(tokenizer, return_logprob=True))
        assert status == 200, out
        meta = out["meta_info"]
        assert meta["prompt_tokens"] == expected["prompt_tokens"], prompt
        tokens = [token for _, token, _ in meta["output_token_logprobs"]]
        logprobs = [logprob for logprob, _, _ in meta["output_token_logprobs"]]
        assert tokens == expected["tokens"], (prompt, tokens, expected)
        assert logprobs == pytest.approx(expected["logprobs"], abs=LOGPROB_ATOL), prompt


@pytest.mark.parametrize("live", BASE, indirect=True)
def test_chat_equals_transformers(live):
    tokenizer = live.tokenizer
    for prompt, expected in zip(CORRECTNESS_PROMPTS[live.config.family], live.reference(), strict=True):
        status, out = live.server.post("/v1/chat/completions", prompt.chat(logprobs=True, top_logprobs=2))
        assert status == 200, out
        choice = out["choices"][0]
        assert out["usage"]["prompt_tokens"] == expected["prompt_tokens"]
        content = choice["logprobs"]["content"]
        assert [bytes(item["bytes"]) for item in content] == [_token_bytes(tokenizer, t) for t in expected["tokens"]]
        assert [item["logprob"] for item in content] == pytest.approx(expected["logprobs"], abs=LOGPROB_ATOL)
        for item in content:  # the chosen token is the most likely one (greedy), listed first
            assert item["top_logprobs"][0]["logprob"] == pytest.approx(item["logprob"], abs=1e-6)


def _token_bytes(tokenizer, token: int) -> bytes:
    """The bytes of one token: a special token's text, else the byte a byte-level token stands for."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    text = tokenizer.convert_ids_to_tokens(token)
    if token in tokenizer.all_special_ids:
        return text.encode()
    chars = {char: byte for byte, char in bytes_to_unicode().items()}
    return bytes(chars[char] for char in text)
