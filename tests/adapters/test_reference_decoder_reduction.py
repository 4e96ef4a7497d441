"""Reductions through the reference decoder's hooks: per-layer cache lengths as LightKV's schedule plans them,
a sample alone equals the sample in a batch, compact positions, the dropping methods (FastV, RandomDrop) and the
post-prefill evictions (PrefixKV, AirCache, LOOK-M)."""

from __future__ import annotations

import pytest
import torch
from helpers.decoder_cases import CONFIG, chain_of, left_pad, lightkv, make_sample, prefill
from helpers.tolerances import assert_close_rounding

from lightkv_core import LightKVConfig, lightkv_stage
from lightkv_core.budget import layer_kv_lengths
from lightkv_core.methods import AirCache, FastV, LightKV, LookM, PrefillReduction, PrefixKV, RandomDrop
from lightkv_core.methods.fastv import kept_count
from lightkv_core.plan import LengthPlan, plan_lengths

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------------------
# 1. Per-layer cache lengths as planned


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
# 2. Batch independence under compression


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
# 3. Compact positions


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
# 4. FastV and RandomDrop through the decoder


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
# 5. Post-prefill eviction (PrefixKV, AirCache, LOOK-M) through the same hooks


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
