"""The post-prefill eviction methods (PrefixKV, AirCache, LOOK-M), their budgets, and the method registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightkv_core import VisionSpan
from lightkv_core.budget import apportion
from lightkv_core.methods import (
    METHODS,
    AirCache,
    FastV,
    KVEviction,
    LightKV,
    LookM,
    PrefillReduction,
    PrefixKV,
    RandomDrop,
    UnguidedMerge,
    method_by_name,
)
from lightkv_core.methods.aircache import layer_weights, skewness
from lightkv_core.methods.lookm import merge_into_pivots
from lightkv_core.methods.prefixkv import cumulative_mass, prefix_sizes, save_calibration, search_sizes

pytestmark = pytest.mark.usefixtures("single_thread")

LAYERS = 4
BACKEND = "torch"  # the kernel's own tests cover Triton against the oracle


# ----------------------------------------------------------------------------------------------
# NumPy float64 references


def softmax_rows(q: np.ndarray, k: np.ndarray, row: int, allowed: np.ndarray) -> np.ndarray:
    """``(H, S)`` softmax of query ``row`` over the ``allowed`` keys (GQA), 0 elsewhere."""
    heads, _, dim = q.shape
    group = heads // k.shape[0]
    out = np.zeros((heads, k.shape[1]))
    keys = np.nonzero(allowed)[0]
    for h in range(heads):
        logits = np.array([float(q[h, row] @ k[h // group, j]) / math.sqrt(dim) for j in keys])
        p = np.exp(logits - logits.max())
        out[h, keys] = p / p.sum()
    return out


def received(q: np.ndarray, k: np.ndarray, real: np.ndarray) -> np.ndarray:
    """``(H, S)`` causal attention each key receives, summed over real queries (one sample)."""
    seq = real.shape[0]
    total = np.zeros((q.shape[0], seq))
    for i in np.nonzero(real)[0]:
        total += softmax_rows(q, k, i, real & (np.arange(seq) <= i))
    return total


# ----------------------------------------------------------------------------------------------
# Inputs: one image of rows x cols tokens between text, left-padded batches


def make_case(seed: int, before: tuple[int, ...] = (3, 5), grid=(4, 6), after=(4, 2), heads=4, kv_heads=2, dim=8):
    """Random per-layer q/k/v caches for a left-padded batch; returns (q, k, v, spans, real)."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = grid
    lengths = [b + rows * cols + a for b, a in zip(before, after, strict=True)]
    seq = max(lengths)
    real = torch.zeros(len(lengths), seq, dtype=torch.bool)
    spans = []
    for b, length in enumerate(lengths):
        pad = seq - length
        real[b, pad:] = True
        start = pad + before[b]
        spans.append([VisionSpan(start, start + rows * cols, rows, cols)])
    batch = len(lengths)
    q = [torch.randn(batch, heads, seq, dim, generator=generator) * 1.5 for _ in range(LAYERS)]
    k = [torch.randn(batch, kv_heads, seq, dim, generator=generator) * 1.5 for _ in range(LAYERS)]
    v = [torch.randn(batch, kv_heads, seq, dim, generator=generator) for _ in range(LAYERS)]
    return q, k, v, spans, real


def run(method: KVEviction, case) -> tuple[list, list]:
    q, k, v, spans, real = case
    observations = [method.observe(i, q[i], k[i], spans, attention_mask=real) for i in range(LAYERS)]
    return observations, method.evict(observations, k, v, spans, attention_mask=real)


def vision_mask(spans, real) -> torch.Tensor:
    mask = torch.zeros_like(real)
    for b, sample in enumerate(spans):
        for span in sample:
            mask[b, span.start : span.end] = True
    return mask


def held(eviction, b: int, head: int = 0) -> set[int]:
    return {int(i) for i in eviction.slots[b, head] if i >= 0}


# ----------------------------------------------------------------------------------------------
# Budgets


@settings(max_examples=200, deadline=None)
@given(
    weights=st.lists(st.floats(0, 10), min_size=1, max_size=8),
    caps=st.data(),
)
def test_apportion_sums_exactly_under_caps(weights, caps):
    cap = caps.draw(st.lists(st.integers(0, 30), min_size=len(weights), max_size=len(weights)))
    total = caps.draw(st.integers(0, sum(cap)))
    sizes = apportion(weights, total, cap)
    assert sum(sizes) == total
    assert all(0 <= s <= c for s, c in zip(sizes, cap, strict=True))
    mass = sum(weights)
    if mass > 0 and all(w / mass * total <= c for w, c in zip(weights, cap, strict=True)):
        assert all(abs(s - w / mass * total) < 1 for s, w in zip(sizes, weights, strict=True))


def test_apportion_rejects_bad_input():
    with pytest.raises(ValueError, match="total"):
        apportion([1, 1], 5, [2, 2])
    with pytest.raises(ValueError, match="non-negative"):
        apportion([1, -1], 1, [2, 2])
    with pytest.raises(ValueError, match="weights for"):
        apportion([1], 1, [2, 2])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), layers=st.integers(1, 6), n=st.integers(1, 40), data=st.data())
def test_prefixkv_sizes_never_shrink_as_p_grows_and_sum_to_the_budget(seed, layers, n, data):
    generator = torch.Generator().manual_seed(seed)
    importance = torch.rand(layers, n, generator=generator) ** 4
    cumulative = cumulative_mass(importance)
    thresholds = sorted(data.draw(st.lists(st.floats(0, 1), min_size=2, max_size=6)))
    sizes = [prefix_sizes(cumulative, p) for p in thresholds]
    for smaller, larger in zip(sizes, sizes[1:], strict=False):
        assert bool((larger >= smaller).all())
    for p, size in zip(thresholds, sizes, strict=True):  # the smallest prefix reaching p
        for layer in range(layers):
            s = int(size[layer])
            if p > 0:
                assert float(cumulative[layer, s - 1]) >= p - 1e-12 or s == n
                assert s == 1 or float(cumulative[layer, s - 2]) < p
    budget = data.draw(st.integers(0, layers * n))
    found, threshold = search_sizes(importance, budget)
    assert sum(found) == budget and all(0 <= s <= n for s in found)
    assert 0.0 <= threshold <= 1.0


def test_aircache_layer_weights_follow_strength_and_skewness():
    flat = torch.full((16,), 0.1)
    spiky = torch.tensor([5.0] + [0.01] * 15)
    assert skewness(flat) == 0.0 and skewness(spiky) > 3
    weights = layer_weights(torch.stack([flat, spiky]))
    assert math.isclose(sum(weights), 1.0)
    strength = np.array([1.6, 5.15]) / 6.75
    assert weights[0] == pytest.approx(strength[0] / 2)  # no skewness: only its strength share
    assert weights[1] == pytest.approx((strength[1] + 1.0) / 2)


# ----------------------------------------------------------------------------------------------
# PrefixKV


@pytest.mark.parametrize("retention", [0.0, 0.3, 0.55, 1.0])
def test_prefixkv_keeps_the_budget_the_sinks_and_the_top_tokens(retention):
    case = make_case(1)
    q, k, _, spans, real = case
    method = PrefixKV(retention=retention, sink=2, backend=BACKEND)
    observations, evictions = run(method, case)
    vision = vision_mask(spans, real)
    for b in range(real.shape[0]):
        n = int(vision[b].sum())
        kept_vision = []
        for layer, evicted in enumerate(evictions):
            expected = received(q[layer][b].numpy(), k[layer][b].numpy(), real[b].numpy()).mean(axis=0)
            np.testing.assert_allclose(observations[layer][b].numpy(), expected, rtol=1e-4, atol=1e-6)
            tokens = held(evicted, b)
            assert all(held(evicted, b, h) == tokens for h in range(evicted.slots.shape[1]))
            text = set(np.nonzero((real[b] & ~vision[b]).numpy())[0].tolist())
            assert text <= tokens
            kept = sorted(tokens - text)
            kept_vision.append(len(kept))
            dropped = set(np.nonzero(vision[b].numpy())[0].tolist()) - set(kept)
            if kept and dropped:
                assert min(expected[kept]) >= max(expected[list(dropped)]) - 1e-6
        assert sum(kept_vision) == round(retention * n * LAYERS)


def test_prefixkv_scope_all_protects_sinks_and_the_last_token():
    case = make_case(2)
    _, _, _, spans, real = case
    method = PrefixKV(retention=0.2, scope="all", sink=3, backend=BACKEND)
    _, evictions = run(method, case)
    for b in range(real.shape[0]):
        rows = np.nonzero(real[b].numpy())[0]
        protected = set(rows[:3].tolist()) | {int(rows[-1])}
        candidates = len(rows) - len(protected)
        total = 0
        for evicted in evictions:
            tokens = held(evicted, b)
            assert protected <= tokens
            total += len(tokens) - len(protected)
        assert total == round(0.2 * candidates * LAYERS)


def test_prefixkv_calibration_round_trip(tmp_path):
    path = tmp_path / "calibration.json"
    save_calibration(path, [1.0, 0.5, 0.25, 0.25], PrefixKV(retention=0.5), prompts=3, model="test")
    method = PrefixKV.from_calibration(path, retention=0.25, backend=BACKEND)
    assert method.fractions == (1.0, 0.5, 0.25, 0.25) and method.retention == 0.25
    case = make_case(3)
    _, evictions = run(method, case)
    candidates = method.candidates(case[3], case[4])  # the image's first token is a sink in sample 0
    for b in range(case[4].shape[0]):
        index = set(np.nonzero(candidates[b].numpy())[0].tolist())
        n = len(index)
        per_layer = [len(held(e, b) & index) for e in evictions]
        assert per_layer == apportion([1.0, 0.5, 0.25, 0.25], round(0.25 * n * LAYERS), [n] * LAYERS)
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a PrefixKV calibration"):
        PrefixKV.from_calibration(tmp_path / "other.json")
    with pytest.raises(ValueError, match="layers"):
        PrefixKV(fractions=(0.5, 0.5)).layer_sizes(torch.rand(4, 10), 5)


# ----------------------------------------------------------------------------------------------
# AirCache


def test_aircache_elite_window_importance_and_budgets():
    case = make_case(4)
    q, k, _, spans, real = case
    method = AirCache(retention=0.35, alpha=0.6, backend=BACKEND)
    observations, evictions = run(method, case)
    vision = vision_mask(spans, real)
    for b in range(real.shape[0]):
        r, seq = real[b].numpy(), real.shape[1]
        text = r & ~vision[b].numpy()
        last = int(np.nonzero(r)[0].max())
        n = int(vision[b].sum())
        importances = []
        for layer in range(LAYERS):
            qn, kn = q[layer][b].numpy(), k[layer][b].numpy()
            from_last = softmax_rows(qn, kn, last, r).mean(axis=0)
            elite = text & (from_last >= 0.6 * from_last[text].max())
            expected = np.zeros(seq)
            for i in np.nonzero(elite)[0]:
                allowed = (vision[b].numpy() | elite) & (np.arange(seq) <= i)
                expected += softmax_rows(qn, kn, i, allowed).mean(axis=0)
            expected = np.where(vision[b].numpy(), expected / elite.sum(), 0)
            np.testing.assert_allclose(observations[layer][b].numpy(), expected, rtol=1e-4, atol=1e-7)
            importances.append(expected[vision[b].numpy()])
        index = np.nonzero(vision[b].numpy())[0]
        sizes = apportion(layer_weights(torch.tensor(np.stack(importances))), round(0.35 * n * LAYERS), [n] * LAYERS)
        for layer, evicted in enumerate(evictions):
            tokens = held(evicted, b)
            assert set(np.nonzero(text)[0].tolist()) <= tokens
            kept = sorted(tokens & set(index.tolist()))
            assert len(kept) == sizes[layer]
            dropped = sorted(set(index.tolist()) - set(kept))
            if kept and dropped:
                scores = observations[layer][b].numpy()
                assert scores[kept].min() >= scores[dropped].max() - 1e-7
        assert sum(sizes) == round(0.35 * n * LAYERS)


# ----------------------------------------------------------------------------------------------
# LOOK-M


def oracle_merge(keys, values, kept, evicted, merge):
    keys, values = keys.astype(np.float64).copy(), values.astype(np.float64).copy()
    if merge == "none" or not len(evicted):
        return keys, values
    unit = keys / (np.linalg.norm(keys, axis=1, keepdims=True) + 1e-8)
    groups: dict[int, list[tuple[int, float]]] = {}
    for e in evicted:
        sims = [float(unit[e] @ unit[c]) for c in kept]
        best = int(np.argmax(sims))
        groups.setdefault(kept[best], []).append((e, sims[best]))
    for cache in (keys, values):
        original = cache.copy()
        for c, members in groups.items():
            xs = np.stack([original[e] for e, _ in members])
            if merge == "averaged":
                cache[c] = (original[c] + xs.sum(0)) / (1 + len(members))
            elif merge == "pivotal":
                cache[c] = (original[c] + xs.mean(0)) / 2
            else:
                w = np.array([max(s, 0.0) for _, s in members])
                cache[c] = (original[c] + (w[:, None] * xs).sum(0)) / (1 + w.sum())
    return keys, values


@pytest.mark.parametrize("merge", ["pivotal", "averaged", "weighted", "none"])
def test_lookm_keeps_text_honours_the_budget_and_merges_as_stated(merge):
    case = make_case(5)
    q, k, v, spans, real = case
    method = LookM(retention=0.3, recent=3, merge=merge, backend=BACKEND)
    observations, evictions = run(method, case)
    vision = vision_mask(spans, real)
    kv_heads = k[0].shape[1]
    for b in range(real.shape[0]):
        n = int(vision[b].sum())
        text = set(np.nonzero((real[b] & ~vision[b]).numpy())[0].tolist())
        sizes = apportion([1.0] * LAYERS, round(0.3 * n * LAYERS), [n] * LAYERS)
        for layer, evicted in enumerate(evictions):
            expected = received(q[layer][b].numpy(), k[layer][b].numpy(), real[b].numpy())
            per_kv = expected.reshape(kv_heads, -1, expected.shape[-1]).mean(axis=1)
            np.testing.assert_allclose(observations[layer][b].numpy(), per_kv, rtol=1e-4, atol=1e-6)
            for h in range(kv_heads):
                tokens = held(evicted, b, h)
                assert text <= tokens
                kept_vision = sorted(tokens - text)
                assert len(kept_vision) == sizes[layer]
                dropped = sorted(set(np.nonzero(vision[b].numpy())[0].tolist()) - tokens)
                ranked = [i for i in kept_vision if i < real.shape[1] - 3]  # not in the recent window
                if ranked and dropped:
                    assert per_kv[h, ranked].min() >= per_kv[h, dropped].max() - 1e-6
                keys, values = oracle_merge(
                    k[layer][b, h].numpy(), v[layer][b, h].numpy(), sorted(tokens), dropped, merge
                )
                slots = evicted.slots[b, h]
                alive = slots >= 0
                np.testing.assert_allclose(evicted.keys[b, h][alive].numpy(), keys[slots[alive]], atol=1e-5)
                np.testing.assert_allclose(evicted.values[b, h][alive].numpy(), values[slots[alive]], atol=1e-5)
                assert not evicted.keys[b, h][~alive].any()


def test_lookm_heads_choose_their_own_tokens_and_the_recent_window_is_kept():
    case = make_case(6, before=(2,), after=(1,))  # the image ends one token before the prompt does
    method = LookM(retention=0.25, recent=3, merge="none", backend=BACKEND)
    _, evictions = run(method, case)
    seq = case[4].shape[1]
    for evicted in evictions:
        for h in range(evicted.slots.shape[1]):
            assert {seq - 3, seq - 2, seq - 1} <= held(evicted, 0, h)
    assert any(held(e, 0, 0) != held(e, 0, 1) for e in evictions)


def test_merge_into_pivots_with_nothing_to_merge_is_a_copy():
    keys, values = torch.randn(6, 4), torch.randn(6, 4)
    nothing = torch.tensor([], dtype=torch.long)
    out_keys, out_values = merge_into_pivots(keys, values, torch.arange(6), nothing, "pivotal")
    assert torch.equal(out_keys, keys) and torch.equal(out_values, values)


@pytest.mark.parametrize("method", [PrefixKV, AirCache, LookM])
def test_full_retention_keeps_every_entry_unchanged(method):
    case = make_case(7)
    _, k, v, _, real = case
    _, evictions = run(method(retention=1.0, backend=BACKEND), case)
    for layer, evicted in enumerate(evictions):
        for b in range(real.shape[0]):
            slots = evicted.slots[b, 0]
            assert slots[slots >= 0].tolist() == np.nonzero(real[b].numpy())[0].tolist()
            alive = slots >= 0
            assert torch.equal(evicted.keys[b, :, alive], k[layer][b][:, slots[alive]])
            assert torch.equal(evicted.values[b, :, alive], v[layer][b][:, slots[alive]])


@pytest.mark.parametrize("method", [PrefixKV, AirCache, LookM])
def test_a_batch_evicts_as_its_samples_alone(method):
    case = make_case(8)
    q, k, v, spans, real = case
    instance = method(retention=0.4, backend=BACKEND)
    _, together = run(instance, case)
    for b in range(real.shape[0]):
        pad = int((~real[b]).sum())
        alone_case = ([t[b : b + 1, :, pad:] for t in q], [t[b : b + 1, :, pad:] for t in k],
                      [t[b : b + 1, :, pad:] for t in v],
                      [[VisionSpan(s.start - pad, s.end - pad, s.rows, s.cols) for s in spans[b]]],
                      real[b : b + 1, pad:])  # fmt: skip
        _, alone = run(instance, alone_case)
        for joint, single in zip(together, alone, strict=True):
            alive = joint.slots[b, 0] >= 0
            assert torch.equal(joint.slots[b][:, alive] - pad, single.slots[0])
            torch.testing.assert_close(joint.keys[b][:, alive], single.keys[0], atol=1e-5, rtol=1e-5)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="retention"):
        PrefixKV(retention=1.5)
    with pytest.raises(ValueError, match="scope"):
        PrefixKV(scope="text")
    with pytest.raises(ValueError, match="alpha"):
        AirCache(alpha=0.0)
    with pytest.raises(ValueError, match="merge"):
        LookM(merge="max")
    with pytest.raises(ValueError, match="recent"):
        LookM(recent=-1)
    case = make_case(9)
    with pytest.raises(ValueError, match="one observation"):
        PrefixKV().evict([], case[1], case[2], case[3], attention_mask=case[4])


# ----------------------------------------------------------------------------------------------
# Registry


def test_registry_builds_every_method_by_name():
    assert {"lightkv", "unguided", "fastv", "prefixkv", "aircache", "lookm"} <= set(METHODS)
    kinds = {name: method_by_name(name, 32) for name in METHODS}
    assert isinstance(kinds["lightkv"], LightKV) and kinds["lightkv"].config.merge_layers == (12, 18, 24)
    assert isinstance(kinds["unguided"], UnguidedMerge) and kinds["unguided"].config.guide == "none"
    assert kinds["fastv"] == FastV(1, 0.5)
    assert isinstance(kinds["random"], RandomDrop)
    for name in ("prefixkv", "aircache", "lookm"):
        assert isinstance(kinds[name], KVEviction) and kinds[name].retention == 0.55
    for name in ("lightkv", "unguided", "fastv", "random"):
        assert isinstance(kinds[name], PrefillReduction)
    assert method_by_name("prefixkv", 8, retention=0.2).retention == 0.2
    fastv = method_by_name("fastv", 32, retention=0.5)
    assert (2 + 30 * (1 - fastv.ratio)) / 32 == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown method"):
        method_by_name("h2o", 32)
    with pytest.raises(ValueError, match="no retention"):
        method_by_name("lightkv", 32, retention=0.5)
    with pytest.raises(ValueError, match="out of reach"):
        method_by_name("fastv", 32, retention=0.01)
