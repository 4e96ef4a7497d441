"""``generate()`` unchanged under the transformers adapter in every mode the stock model supports: greedy,
sampling, several return sequences, beam search, no cache, streaming, and a second call with other images.

With every ratio 0 each mode is bit-identical to the stock model on all five model kinds. Compressed, every mode
runs, each copy ``generate()`` makes of a prompt (beams, return sequences) is compressed as the prompt alone, and
a no-cache generation under the same merges equals cached decoding.
"""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("transformers")

from helpers.hf_cases import BACKEND, batch_of_two, image_for, released  # noqa: E402
from helpers.hf_models import KINDS, Sample, build, make_inputs  # noqa: E402
from helpers.hf_replay import Replay  # noqa: E402
from helpers.tolerances import assert_close_rounding, text_model_chain  # noqa: E402
from transformers import TextIteratorStreamer  # noqa: E402

from lightkv_adapters.hf import lightkv  # noqa: E402
from lightkv_core import LightKVConfig  # noqa: E402
from lightkv_core.methods import LightKV  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

NEW_TOKENS = 3

#: generate() keyword arguments of each mode (sampling modes reseed before each call).
MODES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, top_k=0),
    "sampling, 2 return sequences": dict(do_sample=True, top_k=0, num_return_sequences=2),
    "beam search": dict(num_beams=2, do_sample=False),
    "beam search, 2 return sequences": dict(num_beams=2, num_return_sequences=2, do_sample=False),
    "no cache": dict(do_sample=False, use_cache=False),
}


def zero_ratios(kind: str) -> LightKVConfig:
    schedule = released(kind)
    return LightKVConfig(schedule.merge_layers, schedule.merge_windows, (0.0,) * len(schedule.merge_layers))


def run(model, inputs: dict, **kwargs) -> torch.Tensor:
    torch.manual_seed(0)
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, **kwargs)


class IdTokenizer:
    """Just enough of a tokenizer for :class:`TextIteratorStreamer`: a token decodes to its id."""

    def decode(self, ids, **kwargs) -> str:
        return "".join(f"<{int(token)}>" for token in ids)


def streamed(model, inputs: dict) -> str:
    streamer = TextIteratorStreamer(IdTokenizer(), skip_prompt=True, timeout=120)
    kwargs = dict(inputs, streamer=streamer, max_new_tokens=NEW_TOKENS, do_sample=False)
    thread = threading.Thread(target=model.generate, kwargs=kwargs)
    thread.start()
    text = "".join(streamer)
    thread.join(timeout=120)
    assert not thread.is_alive()
    return text


@pytest.mark.parametrize("kind", KINDS)
def test_every_mode_at_zero_ratios_is_bit_identical(kind: str) -> None:
    model = build(kind)
    inputs = make_inputs(model, kind, batch_of_two(kind))
    other = make_inputs(model, kind, [Sample((image_for(kind),), seed=5)])
    stock = {name: run(model, inputs, **kwargs) for name, kwargs in MODES.items()}
    stock_other, stock_stream = run(model, other), streamed(model, other)  # streamers take one prompt
    with lightkv(model, zero_ratios(kind), backend=BACKEND):
        for name, kwargs in MODES.items():
            assert torch.equal(run(model, inputs, **kwargs), stock[name]), name
        assert torch.equal(run(model, other), stock_other), "a second generate() with other images"
        assert streamed(model, other) == stock_stream


@pytest.mark.parametrize("kind", ["llava", "llava-next", "qwen2.5-vl"])
def test_every_mode_runs_compressed_and_each_copy_is_compressed_as_its_prompt(kind: str) -> None:
    model = build(kind)
    inputs = make_inputs(model, kind, batch_of_two(kind))
    with lightkv(model, released(kind), backend=BACKEND):
        run(model, inputs)
        alone = model.lightkv_stats.kv_tokens
        for name, kwargs in MODES.items():
            out = run(model, inputs, **kwargs)
            copies = kwargs.get("num_beams", kwargs.get("num_return_sequences", 1))  # the prefill's batch
            assert out.shape[0] == 2 * kwargs.get("num_return_sequences", 1), name
            expected = alone.repeat_interleave(copies, dim=1)
            if not kwargs.get("use_cache", True):  # the last forward recomputed prompt + all but the last token
                expected = expected + NEW_TOKENS - 1
            assert torch.equal(model.lightkv_stats.kv_tokens, expected), name
            assert (model.lightkv_stats.kv_tokens[-1] < model.lightkv_stats.kv_tokens[0]).all(), name
        single = make_inputs(model, kind, batch_of_two(kind)[:1])
        assert streamed(model, single) == "".join(f"<{int(t)}>" for t in run(model, single)[0, -NEW_TOKENS:])


@pytest.mark.parametrize("kind", ["llava", "qwen2.5-vl"])
def test_no_cache_generation_under_the_same_merges_equals_cached_decoding(kind: str) -> None:
    model = build(kind)
    inputs = make_inputs(model, kind, [Sample((image_for(kind),), after=7)])
    kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with lightkv(model, Replay(LightKV(released(kind), BACKEND))):
        cached = model.generate(**inputs, **kwargs)
        uncached = model.generate(**inputs, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    chain = text_model_chain(model.model.language_model.config, cached.sequences.shape[1])
    for step in range(NEW_TOKENS):
        assert_close_rounding(uncached.logits[step], cached.logits[step], chain)
