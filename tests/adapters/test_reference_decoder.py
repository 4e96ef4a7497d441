"""The reference decoder: Hugging Face parity, per-layer KV lengths, caching, batching and the reduction hooks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers.tolerances import assert_close_rounding, decoder_chain

from lightkv_adapters.reference.decoder import Decoder, DecoderConfig, LayerwiseKVCache
from lightkv_core import LightKVConfig, lightkv_stage
from lightkv_core.budget import layer_kv_lengths
from lightkv_core.methods import AirCache, FastV, LightKV, LookM, PrefillReduction, PrefixKV, RandomDrop
from lightkv_core.methods.fastv import kept_count
from lightkv_core.plan import LengthPlan, plan_lengths

CONFIG = DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2)


pytestmark = pytest.mark.usefixtures("single_thread")


def chain_of(model: Decoder, keys: int) -> int:
    """Rounded operations from the embeddings to a logit of ``model`` attending over ``keys`` tokens."""
    config = model.config
    head_dim = config.hidden_size // config.num_heads
    return decoder_chain(config.num_layers, config.hidden_size, config.intermediate_size, head_dim, keys)


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        return Decoder(CONFIG).eval()


@dataclass
class Sample:
    """One prompt: ``embeds`` ``(S, D)`` and its vision spans ``(start, end, rows, cols)``."""

    embeds: torch.Tensor
    spans: list[tuple[int, int, int, int]]

    @property
    def length(self) -> int:
        return self.embeds.shape[0]


def make_sample(model: Decoder, seed: int, before: int, side: int | None, after: int) -> Sample:
    """``before`` text tokens, an optional ``side x side`` image (random embeddings), ``after`` text tokens."""
    generator = torch.Generator().manual_seed(seed)
    dim = model.config.hidden_size
    with torch.no_grad():
        ids = torch.randint(0, model.config.vocab_size, (before + after,), generator=generator)
        text = model.model.embed_tokens(ids)
    if side is None:
        return Sample(text, [])
    image = torch.randn(side * side, dim, generator=generator)
    embeds = torch.cat([text[:before], image, text[before:]])
    return Sample(embeds, [(before, before + side * side, side, side)])


def left_pad(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, list[list[tuple[int, int, int, int]]]]:
    """``(embeds (B, S, D), mask (B, S) bool, spans)`` of the samples, left-padded with zero rows."""
    width = max(s.length for s in samples)
    dim = samples[0].embeds.shape[1]
    embeds = torch.zeros(len(samples), width, dim)
    mask = torch.zeros(len(samples), width, dtype=torch.bool)
    spans = []
    for b, sample in enumerate(samples):
        pad = width - sample.length
        embeds[b, pad:] = sample.embeds
        mask[b, pad:] = True
        spans.append([(start + pad, end + pad, rows, cols) for start, end, rows, cols in sample.spans])
    return embeds, mask, spans


def prefill(model: Decoder, embeds, mask=None, spans=None, reduction=None):
    """``(logits, stats, cache)`` of a prefill with a fresh cache."""
    cache = LayerwiseKVCache.empty(model.config.num_layers)
    with torch.no_grad():
        logits, stats = model(embeds, attention_mask=mask, spans=spans, cache=cache, reduction=reduction)
    return logits, stats, cache


def lightkv(layers, windows, ratios, **options) -> LightKV:
    return LightKV(LightKVConfig(tuple(layers), tuple(windows), tuple(ratios), **options), backend="torch")


# ----------------------------------------------------------------------------------------------
# 1. Hugging Face parity


@pytest.fixture(scope="module")
def hf_pair():
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attn_implementation="eager",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(7)
        hf = transformers.LlamaForCausalLM(hf_config).eval()
        with torch.no_grad():  # HF's 0.02 init gives near-uniform logits; widen it so greedy picks are clear
            for name, parameter in hf.named_parameters():
                if "norm" not in name:
                    parameter.normal_(0.0, 0.3)
    ours = Decoder(
        DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2)
    ).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def test_hf_parity_logits_and_zero_ratio_reduction(hf_pair):
    hf, ours = hf_pair
    samples = [make_sample(ours, 1, 3, 8, 4), make_sample(ours, 2, 2, 8, 1)]
    embeds, mask, spans = left_pad(samples)
    assert not bool(mask.all())  # sample 1 is padded
    position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=position_ids).logits.float()
    plain, _ = ours(embeds, attention_mask=mask)
    assert plain.shape == expected.shape
    # two implementations of one float32 forward: they differ by rounding only
    chain = chain_of(ours, embeds.shape[1])
    assert_close_rounding(plain[mask], expected[mask], chain)

    zero = lightkv((0, 1), (2, 1), (0.0, 0.0))
    reduced, stats, cache = prefill(ours, embeds, mask, spans, zero)
    plain_cached, _, _ = prefill(ours, embeds, mask)
    assert torch.equal(reduced, plain)
    assert torch.equal(plain_cached, plain)
    assert_close_rounding(reduced[mask], expected[mask], chain)
    assert stats.vision_tokens.tolist() == [[64, 64]] * 3
    assert cache.valid_tokens().tolist() == [[s.length for s in samples]] * 3


def test_hf_parity_greedy_generate(hf_pair):
    hf, ours = hf_pair
    embeds, mask, _ = left_pad([make_sample(ours, 3, 4, None, 5), make_sample(ours, 4, 2, None, 3)])
    with torch.no_grad():
        expected = hf.generate(
            inputs_embeds=embeds, attention_mask=mask.long(), max_new_tokens=8, do_sample=False, pad_token_id=0
        )
    tokens, _ = ours.generate(embeds, attention_mask=mask, max_new_tokens=8)
    assert tokens.shape == (2, 8)
    assert tokens.tolist() == expected.tolist()


# ----------------------------------------------------------------------------------------------
# 2. Per-layer cache lengths as planned


class RecordingLightKV(PrefillReduction):
    """LightKV driven by hand: calls :func:`lightkv_stage` with the schedule and records each stage."""

    def __init__(self, config: LightKVConfig, backend: str) -> None:
        self.config = config
        self.backend = backend
        self.lengths: list[list[int]] = []
        self.vision: list[list[int]] = []

    @property
    def reduce_layers(self) -> tuple[int, ...]:
        return self.config.merge_layers

    @property
    def position_mode(self) -> str:
        return self.config.position_mode

    def plan_lengths(self, spans, seq_len: int) -> LengthPlan:
        return plan_lengths(spans, self.config, seq_len)

    def reduce(self, layer, hidden, q, k, spans, *, position_ids, attention_mask, padding_side):
        window, ratio = self.config.stage_at(layer)
        result = lightkv_stage(
            hidden,
            q,
            k,
            spans,
            window,
            ratio,
            position_ids=position_ids,
            attention_mask=attention_mask,
            padding_side=padding_side,
            backend=self.backend,
        )
        self.lengths.append(result.lengths.tolist())
        self.vision.append([sum(s.length for s in sample) for sample in result.spans])
        return result


@pytest.mark.parametrize(
    ("side", "merge_layers", "vision_per_stage"),
    [
        (8, (1, 2), [64, 32, 16]),
        (8, (0, 1), [64, 32, 16]),
        (4, (0, 1), [16, 16, 8]),  # 16 < 8 * 2 * 2: the W=2 stage leaves the image; W=1 halves it
    ],
)
def test_cache_lengths_follow_the_schedule(decoder, backend, side, merge_layers, vision_per_stage):
    samples = [make_sample(decoder, 10, 3, side, 5), make_sample(decoder, 11, 1, side, 2)]
    embeds, mask, spans = left_pad(samples)
    config = LightKVConfig(merge_layers, (2, 1), (0.5, 0.5))
    recorder = RecordingLightKV(config, backend)
    _, stats, cache = prefill(decoder, embeds, mask, spans, recorder)
    layers = CONFIG.num_layers

    expected_vision = layer_kv_lengths(merge_layers, vision_per_stage, layers)
    assert [r[0] for r in recorder.vision] == vision_per_stage[1:]
    assert stats.vision_tokens.tolist() == [[v, v] for v in expected_vision]
    assert stats.original_vision_tokens.tolist() == [side * side] * 2
    first = max(merge_layers[0], 0)
    assert all(stats.vision_tokens[i].tolist() == [side * side] * 2 for i in range(first + 1))

    valid = cache.valid_tokens()
    for b, sample in enumerate(samples):
        per_stage = [sample.length] + [stage[b] for stage in recorder.lengths]
        planned = layer_kv_lengths(merge_layers, per_stage, layers)
        dropped = [side * side - v for v in expected_vision]
        assert valid[:, b].tolist() == planned
        assert planned == [sample.length - d for d in dropped]
        assert stats.kv_tokens[:, b].tolist() == planned
    # every sample's last token sits in the last slot of every layer (left padding kept)
    for layer_cache in cache.layers:
        assert bool(layer_cache.valid[:, -1].all())
        assert layer_cache.length == int(layer_cache.valid.sum(1).max())
    # the LightKV method gives the same plan as driving lightkv_stage by hand
    _, method_stats, method_cache = prefill(decoder, embeds, mask, spans, LightKV(config, backend=backend))
    assert torch.equal(method_cache.valid_tokens(), valid)
    assert torch.equal(method_stats.vision_tokens, stats.vision_tokens)


# ----------------------------------------------------------------------------------------------
# 3. Cached and uncached generation, sampling


def test_generate_with_and_without_cache_agree(decoder):
    embeds, mask, spans = left_pad([make_sample(decoder, 20, 2, 4, 3), make_sample(decoder, 21, 1, None, 4)])
    cached, stats = decoder.generate(embeds, attention_mask=mask, spans=spans, max_new_tokens=10)
    uncached, no_stats = decoder.generate(embeds, attention_mask=mask, spans=spans, max_new_tokens=10, use_cache=False)
    assert cached.tolist() == uncached.tolist()
    assert stats is not None and no_stats is None
    # the decode path matches a full recompute at every new token, not only on the argmax
    cache = LayerwiseKVCache.empty(CONFIG.num_layers)
    with torch.no_grad():
        decoder(embeds, attention_mask=mask, cache=cache)
        new = decoder.model.embed_tokens(cached[:, :3])
        stepped, _ = decoder(new, cache=cache)
        full, _ = decoder(torch.cat([embeds, new], 1), attention_mask=torch.cat([mask, torch.ones(2, 3).bool()], 1))
    # the cached steps and the recompute sum in other orders (other shapes)
    assert_close_rounding(stepped, full[:, -3:], chain_of(decoder, full.shape[1]))
    assert cache.valid_tokens()[:, 1].tolist() == [int(mask[1].sum()) + 3] * CONFIG.num_layers


def test_sampled_generation_is_reproducible(decoder):
    embeds, mask, _ = left_pad([make_sample(decoder, 30, 3, None, 3), make_sample(decoder, 31, 1, None, 2)])

    def sample(seed: int, **options) -> list:
        generator = torch.Generator().manual_seed(seed)
        tokens, _ = decoder.generate(embeds, attention_mask=mask, max_new_tokens=8, generator=generator, **options)
        return tokens.tolist()

    greedy = decoder.generate(embeds, attention_mask=mask, max_new_tokens=8)[0].tolist()
    assert sample(0, temperature=1.0) == sample(0, temperature=1.0)
    assert sample(0, temperature=1.0, top_k=5) == sample(0, temperature=1.0, top_k=5)
    assert sample(0, temperature=0.7, top_k=1) == greedy  # only the argmax survives top-1
    assert any(sample(seed, temperature=5.0) != greedy for seed in range(3))


def test_generate_eos_fills_the_row(decoder):
    embeds, mask, _ = left_pad([make_sample(decoder, 40, 3, None, 3), make_sample(decoder, 41, 1, None, 2)])
    greedy, _ = decoder.generate(embeds, attention_mask=mask, max_new_tokens=6)
    eos = int(greedy[0, 1])
    tokens, _ = decoder.generate(embeds, attention_mask=mask, max_new_tokens=6, eos_token_id=eos)
    for row, free in zip(tokens.tolist(), greedy.tolist(), strict=True):
        if eos in free:
            stop = free.index(eos)
            assert row[: stop + 1] == free[: stop + 1]
            assert all(t == eos for t in row[stop:])
        else:
            assert row == free[: len(row)]


# ----------------------------------------------------------------------------------------------
# 4./5. Batch independence under compression


def test_sample_alone_equals_sample_in_batch_with_lightkv(decoder):
    samples = [make_sample(decoder, 50, 2, 8, 6), make_sample(decoder, 51, 9, 8, 2)]
    reduction = lightkv((1, 2), (2, 1), (0.5, 0.5))
    embeds, mask, spans = left_pad(samples)
    assert samples[0].length != samples[1].length and spans[0][0][0] != spans[1][0][0]
    logits, stats, cache = prefill(decoder, embeds, mask, spans, reduction)
    tokens, _ = decoder.generate(embeds, attention_mask=mask, spans=spans, reduction=reduction, max_new_tokens=6)
    valid = cache.valid_tokens()
    for b, sample in enumerate(samples):
        one = sample.embeds[None]
        alone_logits, alone_stats, alone_cache = prefill(decoder, one, None, [sample.spans], reduction)
        alone_tokens, _ = decoder.generate(one, spans=[sample.spans], reduction=reduction, max_new_tokens=6)
        assert valid[:, b].tolist() == alone_cache.valid_tokens()[:, 0].tolist()
        assert stats.vision_tokens[:, b].tolist() == alone_stats.vision_tokens[:, 0].tolist()
        final = int(valid[-1, b])
        assert alone_logits.shape[1] == final
        # a padded batch and a batch of one sum in other orders (other shapes)
        assert_close_rounding(logits[b, -final:], alone_logits[0], chain_of(decoder, embeds.shape[1]))
        assert tokens[b].tolist() == alone_tokens[0].tolist()
        for index in range(CONFIG.num_layers):
            assert cache.layers[index].next_position[b] == alone_cache.layers[index].next_position[0]


def test_sample_without_image_is_untouched_by_lightkv(decoder):
    text_only = make_sample(decoder, 60, 5, None, 7)
    samples = [make_sample(decoder, 61, 2, 8, 3), text_only]
    embeds, mask, spans = left_pad(samples)
    assert spans[1] == []
    logits, stats, cache = prefill(decoder, embeds, mask, spans, lightkv((0, 2), (2, 1), (0.5, 0.5)))
    alone, _ = decoder(text_only.embeds[None])
    # a padded batch and a batch of one sum in other orders (other shapes)
    assert_close_rounding(logits[1, -text_only.length :], alone[0], chain_of(decoder, embeds.shape[1]))
    assert cache.valid_tokens()[:, 1].tolist() == [text_only.length] * CONFIG.num_layers
    assert stats.vision_tokens[:, 1].tolist() == [0] * CONFIG.num_layers
    assert stats.vision_tokens[:, 0].tolist() == [64, 32, 32, 16]


# ----------------------------------------------------------------------------------------------
# 6. Compact positions


def test_compact_positions_renumber_later_layers(decoder):
    samples = [make_sample(decoder, 70, 3, 8, 4), make_sample(decoder, 71, 1, 8, 2)]
    embeds, mask, spans = left_pad(samples)
    merge_layers = (1, 2)
    compact = lightkv(merge_layers, (2, 1), (0.5, 0.5), positions="compact")
    _, stats, cache = prefill(decoder, embeds, mask, spans, compact)
    valid = cache.valid_tokens()
    for index, layer_cache in enumerate(cache.layers):
        if index > merge_layers[0]:
            assert layer_cache.next_position.tolist() == valid[index].tolist()
        else:
            assert layer_cache.next_position.tolist() == [s.length for s in samples]
    assert stats.vision_tokens[:, 0].tolist() == [64, 64, 32, 16]
    tokens, _ = decoder.generate(embeds, attention_mask=mask, spans=spans, reduction=compact, max_new_tokens=4)
    assert tokens.shape == (2, 4)

    _, _, original_cache = prefill(decoder, embeds, mask, spans, lightkv(merge_layers, (2, 1), (0.5, 0.5)))
    for layer_cache in original_cache.layers:  # original positions: the next token is at the full length
        assert layer_cache.next_position.tolist() == [s.length for s in samples]


# ----------------------------------------------------------------------------------------------
# 7. Errors


def test_errors(decoder):
    sample = make_sample(decoder, 80, 2, 4, 3)
    embeds = sample.embeds[None]
    reduction = lightkv((1,), (1,), (0.5,))
    _, _, cache = prefill(decoder, embeds, None, [sample.spans], reduction)
    new = decoder.model.embed_tokens(torch.tensor([[3]]))
    with torch.no_grad(), pytest.raises(ValueError):
        decoder(new, cache=cache, reduction=reduction, spans=[[]])
    with torch.no_grad(), pytest.raises(ValueError):
        decoder(new, cache=cache, attention_mask=torch.ones(1, 1, dtype=torch.bool))

    right = torch.ones(2, embeds.shape[1], dtype=torch.bool)
    right[1, -2:] = False
    with torch.no_grad(), pytest.raises(ValueError, match="left-padded"):
        decoder(embeds.expand(2, -1, -1), attention_mask=right)
    with torch.no_grad(), pytest.raises(ValueError, match="left-padded"):
        decoder.generate(embeds.expand(2, -1, -1), attention_mask=right, max_new_tokens=2)

    for too_deep in (FastV(CONFIG.num_layers, 0.5), lightkv((1, CONFIG.num_layers), (1, 1), (0.5, 0.5))):
        with torch.no_grad(), pytest.raises(ValueError):
            decoder(embeds, spans=[sample.spans], cache=LayerwiseKVCache.empty(CONFIG.num_layers), reduction=too_deep)
    with pytest.raises(ValueError):
        decoder.generate(embeds, spans=[sample.spans], reduction=reduction, use_cache=False, max_new_tokens=2)
    with torch.no_grad(), pytest.raises(ValueError):
        decoder(embeds, reduction=reduction)  # a reduction needs spans
    with pytest.raises(ValueError):
        decoder.generate(embeds, max_new_tokens=0)
    with pytest.raises(ValueError):
        decoder.generate(embeds, temperature=-1.0)
    with pytest.raises(ValueError):
        DecoderConfig(vocab_size=10, hidden_size=30, intermediate_size=8, num_layers=1, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError):
        DecoderConfig(vocab_size=10, hidden_size=32, intermediate_size=8, num_layers=1, num_heads=4, num_kv_heads=3)


# ----------------------------------------------------------------------------------------------
# 8. FastV and RandomDrop through the decoder


@pytest.mark.parametrize(
    "method",
    [
        FastV(1, 0.75),
        FastV(0, 0.5, scoring="all_tokens"),
        RandomDrop(2, 0.3, seed=3),
        RandomDrop(1, 1.0),
        RandomDrop(-1, 0.5, seed=1),
    ],
    ids=repr,
)
def test_dropping_methods_through_the_decoder(decoder, method):
    samples = [make_sample(decoder, 90, 3, 6, 4), make_sample(decoder, 91, 1, 8, 2)]
    embeds, mask, spans = left_pad(samples)
    _, stats, cache = prefill(decoder, embeds, mask, spans, method)
    valid = cache.valid_tokens()
    for b, sample in enumerate(samples):
        n = sample.spans[0][1] - sample.spans[0][0]
        kept = kept_count(method.ratio, n)
        expected = [n if index <= method.layer else kept for index in range(CONFIG.num_layers)]
        assert stats.vision_tokens[:, b].tolist() == expected
        assert valid[:, b].tolist() == [sample.length - n + v for v in expected]
        assert stats.kv_tokens[:, b].tolist() == valid[:, b].tolist()
    retention = stats.vision_retention()
    assert retention.shape == (2,)
    assert bool((retention <= 1).all())
    tokens, _ = decoder.generate(embeds, attention_mask=mask, spans=spans, reduction=method, max_new_tokens=3)
    assert tokens.shape == (2, 3)


# ----------------------------------------------------------------------------------------------
# Post-prefill eviction (PrefixKV, AirCache, LOOK-M) through the same hooks


EVICTIONS = [PrefixKV(0.3, backend="torch"), AirCache(0.3, backend="torch"), LookM(0.3, backend="torch")]


@pytest.mark.parametrize("method", EVICTIONS, ids=lambda m: type(m).__name__)
def test_eviction_alone_equals_in_batch_and_meets_its_budget(decoder, method):
    samples = [make_sample(decoder, 60, 2, 8, 6), make_sample(decoder, 61, 9, 8, 2)]
    embeds, mask, spans = left_pad(samples)
    tokens, stats = decoder.generate(embeds, attention_mask=mask, spans=spans, reduction=method, max_new_tokens=5)
    for b, sample in enumerate(samples):
        one = sample.embeds[None]
        alone_tokens, alone_stats = decoder.generate(one, spans=[sample.spans], reduction=method, max_new_tokens=5)
        assert tokens[b].tolist() == alone_tokens[0].tolist()
        assert stats.kv_tokens[:, b].tolist() == alone_stats.kv_tokens[:, 0].tolist()
    if not isinstance(method, PrefixKV):  # PrefixKV's sinks may hold vision tokens outside the budget
        assert stats.vision_tokens.sum(dim=0).tolist() == [round(0.3 * 64 * CONFIG.num_layers)] * 2
    assert bool((stats.kv_tokens - stats.vision_tokens == (stats.original_tokens - 64)[None]).all())


@pytest.mark.parametrize("method", EVICTIONS, ids=lambda m: type(m).__name__)
def test_eviction_at_full_retention_is_the_stock_decoder(decoder, method):
    embeds, mask, spans = left_pad([make_sample(decoder, 62, 3, 8, 5), make_sample(decoder, 63, 1, 8, 2)])
    stock, _ = decoder.generate(embeds, attention_mask=mask, spans=spans, max_new_tokens=5)
    full = type(method)(**{**vars(method), "retention": 1.0})
    kept, stats = decoder.generate(embeds, attention_mask=mask, spans=spans, reduction=full, max_new_tokens=5)
    assert torch.equal(stock, kept) and bool((stats.vision_retention() == 1).all())


def test_eviction_needs_a_cache(decoder):
    sample = make_sample(decoder, 64, 2, 8, 2)
    with pytest.raises(ValueError, match="pass a cache"):
        decoder(sample.embeds[None], spans=[sample.spans], reduction=EVICTIONS[0])
