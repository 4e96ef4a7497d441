"""Live servers at production settings (``tests/live/conftest.py::CONFIGS``): chunked prefill under
``--kv-compress lightkv`` splits text-only prompts and prefills prompts with images whole, with the answers the
Transformers adapter gives; an image prompt past ``--max-prefill-tokens`` is refused alone. The radix cache reuses
text-only prefixes (SGLang's own hit counts), keeps prompts with images out, and gives way to a prompt that needs
its memory. Tensor parallelism answers as one rank. The shared load and correctness tests run on the same servers
(``qwen-radix``, ``qwen-overlap``, ``qwen-tp2`` in their lists). The shared arena of KV pages (every compressed
server but ``llava-lightkv``) serves a text-only prompt of most of the memory."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import CHUNK_TOKENS
from helpers.live_checks import assert_serving, flush_radix_cache, pool_state, refused_chat, wait_pools_free
from helpers.live_requests import CORRECTNESS_PROMPTS, Prompt

pytestmark = pytest.mark.live_server

#: SGLang's log line of each prefill forward: the requests and prompt tokens it ran.
PREFILL_LINE = re.compile(r"Prefill batch.*?#new-seq: (\d+), #new-token: (\d+)")
#: The same line's count of prompt tokens served from the radix cache.
CACHED_LINE = re.compile(r"Prefill batch.*?#cached-token: (\d+)")
#: A text-only prompt of about 3,000 tokens (most of the live servers' 4,096-token KV memory), and another.
STORY = ("The keeper of the lighthouse watched the grey sea every night. " * 48)[:3000]
OTHER_STORY = ("A fisherman mended his green nets on the harbour wall at dawn. " * 48)[:3000]


def prefills_of(live, post: dict, path: str = "/generate") -> tuple[dict, list[tuple[int, int]]]:
    """The answer to ``post`` sent alone, and the ``(requests, tokens)`` of each prefill forward it caused."""
    before = len(live.server.log_text())
    status, out = live.server.post(path, post)
    assert status == 200, out
    return out, [(int(seqs), int(tokens)) for seqs, tokens in PREFILL_LINE.findall(live.server.log_text()[before:])]


@pytest.mark.parametrize("live", ["qwen-radix"], indirect=True)
def test_chunked_prefill_splits_text_only_prompts_and_keeps_images_whole(live):
    """With 32-token chunks: the text-only prompt runs in several prefill forwards of at most 32 tokens, each prompt
    with images in one forward of all its tokens, and every answer equals the Transformers adapter's (on an empty
    radix cache, so that no prefix is reused)."""
    flush_radix_cache(live)
    image_one, image_two, text = CORRECTNESS_PROMPTS[live.config.family]
    for prompt, expected in zip((image_one, image_two, text), live.reference(), strict=True):
        out, prefills = prefills_of(live, prompt.generate(live.tokenizer))
        assert out["output_ids"] == expected["tokens"], prompt
        tokens = expected["prompt_tokens"]
        assert tokens > CHUNK_TOKENS, (prompt, tokens)
        if prompt.images:
            assert prefills == [(1, tokens)], (prompt, prefills)
        else:
            assert len(prefills) == -(-tokens // CHUNK_TOKENS), (prompt, prefills)
            assert all(n <= CHUNK_TOKENS for _, n in prefills) and sum(n for _, n in prefills) == tokens, prefills
    assert "Scheduler hit an exception" not in live.server.log_text()


@pytest.mark.parametrize("live", ["qwen-radix"], indirect=True)
def test_chunked_prefill_refuses_an_image_prompt_past_max_prefill_tokens(live):
    """Three 448x448 images (768 vision tokens) cannot be prefilled whole within ``--max-prefill-tokens 400``: the
    request gets one line naming the flag, and the server goes on serving."""
    big = Prompt("Describe every picture.", tuple((448, 448, 30 + i) for i in range(3)))
    message = refused_chat(live, big)
    assert "prefilled in one piece" in message and "--max-prefill-tokens (400)" in message, message
    assert_serving(live)


@pytest.mark.parametrize("live", ["qwen-lightkv"], indirect=True)
def test_shared_arena_serves_a_text_only_prompt_of_most_of_the_memory(live):
    """A text-only prompt of about 3,000 tokens takes a slot per token in every layer group. The shared arena holds
    it as SGLang's single pool of the same memory (4,096 tokens) would; the fixed pools this server had before, at
    the former default ratios, gave its last group 1,165 slots and refused it. It is answered alike twice, and every
    page comes back."""
    state = pool_state(live)
    assert "arena" in state, state
    story = Prompt(STORY, max_tokens=8)
    status, out = live.server.post("/generate", story.generate(live.tokenizer))
    assert status == 200, out
    assert out["meta_info"]["prompt_tokens"] > 3000
    status, again = live.server.post("/generate", story.generate(live.tokenizer))
    assert status == 200 and again["output_ids"] == out["output_ids"], again
    wait_pools_free(live)


@pytest.mark.parametrize("live", ["qwen-tp2"], indirect=True)
def test_tp2_ranks_sum_their_scores_and_answer_as_one_rank(live):
    """Two tensor-parallel ranks, each with half of every layer's heads, sum their partial guide scores over the TP
    group and so compress alike: a batch of the correctness prompts sent at once is answered as the Transformers
    adapter answers each alone (the TP=1 servers give the same answers), and both ranks ran the prefill."""
    prompts = CORRECTNESS_PROMPTS[live.config.family]
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda prompt: live.server.post("/generate", prompt.generate(live.tokenizer)), prompts))
    for prompt, (status, out), expected in zip(prompts, answers, live.reference(), strict=True):
        assert status == 200 and out["output_ids"] == expected["tokens"], (prompt, out)
    log = live.server.log_text()
    assert "TP0" in log and "TP1" in log, "the server did not start two tensor-parallel ranks"
    assert "Scheduler hit an exception" not in log
    assert_serving(live)


def _generate(live, prompt: Prompt) -> dict:
    status, out = live.server.post("/generate", prompt.generate(live.tokenizer))
    assert status == 200, out
    return out


@pytest.mark.parametrize("live", ["qwen-radix"], indirect=True)
def test_radix_cache_reuses_text_only_prefixes(live):
    """A text-only prompt sent again is served from its cached prefix (SGLang's own ``cached_tokens`` and
    ``#cached-token``), in every layer group, with the Transformers adapter's answer; a prompt extending a cached
    one by a question reuses it too, and answers as it does on an empty cache."""
    flush_radix_cache(live)
    text, expected = CORRECTNESS_PROMPTS[live.config.family][2], live.reference()[2]
    first = _generate(live, text)
    assert first["meta_info"]["cached_tokens"] == 0 and first["output_ids"] == expected["tokens"], first
    before = len(live.server.log_text())
    again = _generate(live, text)
    assert again["meta_info"]["cached_tokens"] > 0 and again["output_ids"] == expected["tokens"], again
    assert any(int(n) > 0 for n in CACHED_LINE.findall(live.server.log_text()[before:]))
    story, longer = Prompt(STORY[:600], max_tokens=8), Prompt(STORY[:600] + " What did he see?", max_tokens=8)
    told = _generate(live, story)
    extended = _generate(live, longer)
    assert extended["meta_info"]["cached_tokens"] > told["meta_info"]["prompt_tokens"] - CHUNK_TOKENS, extended
    flush_radix_cache(live)
    alone = _generate(live, longer)
    assert alone["meta_info"]["cached_tokens"] == 0 and alone["output_ids"] == extended["output_ids"], alone
    wait_pools_free(live)


@pytest.mark.parametrize("live", ["qwen-radix"], indirect=True)
def test_radix_cache_keeps_prompts_with_images_out(live):
    """Two questions about the same image: the second reuses nothing of the first (whose merged KV depends on its
    own question), although their prompts share everything up to the question, and each gets the answer it gets
    on an empty cache (the first: the Transformers adapter's); the same image prompt sent twice is not reused
    either."""
    one = CORRECTNESS_PROMPTS[live.config.family][0]
    other = Prompt("Describe the colours you see.", one.images)
    flush_radix_cache(live)
    other_alone = _generate(live, other)
    flush_radix_cache(live)
    first = _generate(live, one)
    assert first["output_ids"] == live.reference()[0]["tokens"], first
    second = _generate(live, other)
    assert second["meta_info"]["cached_tokens"] == 0 and second["output_ids"] == other_alone["output_ids"], second
    again = _generate(live, one)
    assert again["meta_info"]["cached_tokens"] == 0 and again["output_ids"] == first["output_ids"], again
    wait_pools_free(live)


@pytest.mark.parametrize("live", ["qwen-radix"], indirect=True)
def test_radix_cache_gives_way_to_a_prompt_that_needs_its_memory(live):
    """A cached text-only prompt of about 3,000 tokens holds a slot per token in every layer group, so a second
    one fits only after the pools evict the first from the tree: it is answered, as it is on an empty cache, and
    every page comes back."""
    flush_radix_cache(live)
    _generate(live, Prompt(STORY, max_tokens=4))
    cached = pool_state(live)["arena"]
    assert cached["free_pages"] < cached["pages"] // 2, cached  # the first story stays in the tree
    other = Prompt(OTHER_STORY, max_tokens=4)
    after = _generate(live, other)
    flush_radix_cache(live)
    alone = _generate(live, other)
    assert after["output_ids"] == alone["output_ids"], (after, alone)
    assert "Scheduler hit an exception" not in live.server.log_text()
    assert "memory leak" not in live.server.log_text()
    wait_pools_free(live)


@pytest.mark.parametrize("live", ["qwen-overlap"], indirect=True)
def test_overlap_scheduler_answers_batches_prepared_while_one_runs(live):
    """Under SGLang's overlap scheduler each batch's slots in every layer group are allocated while the previous
    batch runs, and a batch's results (finishes, trims' effects, the radix tree's inserts) are processed after the
    next one starts: the correctness prompts sent three times each, all at once, are each answered as the
    Transformers adapter answers them alone, and every page comes back."""
    status, info = live.server.get("/server_info")
    assert status == 200 and info["disable_overlap_schedule"] is False, info
    prompts = CORRECTNESS_PROMPTS[live.config.family] * 3
    expected = live.reference() * 3
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda prompt: live.server.post("/generate", prompt.generate(live.tokenizer)), prompts))
    for prompt, (status, out), want in zip(prompts, answers, expected, strict=True):
        assert status == 200 and out["output_ids"] == want["tokens"], (prompt, out)
    assert "Scheduler hit an exception" not in live.server.log_text()
    wait_pools_free(live)
