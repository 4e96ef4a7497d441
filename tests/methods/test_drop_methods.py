"""The token-dropping baselines FastV and RandomDrop, and FastV's scoring pieces (``mean_received_attention``,
``kept_count``, ``keep_top_vision``), against NumPy float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.drop_cases import batches, check_drop_result, one_image_batch, padded_mask, run_method
from hypothesis import given, settings
from hypothesis import strategies as st

from lightkv_core import VisionSpan
from lightkv_core.methods import FastV, RandomDrop, mean_received_attention
from lightkv_core.methods.fastv import keep_top_vision, kept_count

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------------------
# NumPy float64 references


def oracle_attention_received(
    q: np.ndarray, k: np.ndarray, real: np.ndarray, last_token_only: bool, scale: float | None = None
) -> np.ndarray:
    """``(B, S)`` attention each key receives: causal softmax over real keys, head ``h`` reading key head
    ``h // (H // Hk)``, averaged over heads, then over the queries (the last real one, or every real one)."""
    batch, heads, seq, dim = q.shape
    group = heads // k.shape[1]
    scale = dim**-0.5 if scale is None else scale
    out = np.zeros((batch, seq))
    for b in range(batch):
        rows = [i for i in range(seq) if real[b, i]]
        queries = [max(rows)] if last_token_only else rows
        for i in queries:
            keys = [j for j in rows if j <= i]
            for h in range(heads):
                logits = np.array([scale * float(np.dot(q[b, h, i], k[b, h // group, j])) for j in keys])
                probs = np.exp(logits - logits.max())
                probs /= probs.sum()
                for j, p in zip(keys, probs, strict=True):
                    out[b, j] += p / heads
        out[b] /= len(queries)
    return out


def expected_kept(ratio: float, n: int) -> int:
    return min(n, math.ceil((1.0 - ratio) * n - 1e-9))


def oracle_keep(scores: np.ndarray, spans: list[list[VisionSpan]], ratio: float, real: np.ndarray) -> np.ndarray:
    """``(B, S)`` bool: every real token except the lowest-scoring mergeable vision tokens of each sample
    (``n`` over all its images; stable sort, so ties keep the lower index)."""
    keep = real.copy()
    for b, sample_spans in enumerate(spans):
        candidates = [
            span.start + i for span in sample_spans for i in range(span.length) if bool(span.mergeable_or_default()[i])
        ]
        if not candidates:
            continue
        candidates = np.array(candidates)
        order = np.argsort(-scores[b, candidates], kind="stable")
        keep[b, candidates] = False
        keep[b, candidates[order[: expected_kept(ratio, len(candidates))]]] = True
    return keep


# ----------------------------------------------------------------------------------------------
# 1. mean_received_attention


@settings(max_examples=40)
@given(
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 3),
    seq=st.integers(1, 9),
    dim=st.sampled_from([2, 4, 8]),
    pads=st.lists(st.integers(0, 8), min_size=3, max_size=3),
    left=st.booleans(),
    last_token_only=st.booleans(),
    scale=st.sampled_from([None, 0.3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_attention_received_matches_oracle(batch, kv_heads, group, seq, dim, pads, left, last_token_only, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(batch, kv_heads * group, seq, dim, generator=generator)
    k = 2 * torch.randn(batch, kv_heads, seq, dim, generator=generator)
    mask = padded_mask([max(1, seq - p) for p in pads[:batch]], seq, left)
    got = mean_received_attention(q, k, mask, last_token_only=last_token_only, scale=scale)
    assert got.dtype == torch.float32 and got.shape == (batch, seq)
    expected = oracle_attention_received(q.double().numpy(), k.double().numpy(), mask.numpy(), last_token_only, scale)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-5)
    assert bool((got[~mask] == 0).all())
    # each query row is a distribution, so the average received attention sums to one
    torch.testing.assert_close(got.sum(dim=1), torch.ones(batch), rtol=0, atol=1e-5)


def test_attention_received_last_token_only_sees_the_last_row():
    q = torch.zeros(1, 1, 4, 2)
    k = torch.zeros(1, 1, 4, 2)
    mask = torch.tensor([[False, True, True, True]])
    got = mean_received_attention(q, k, mask, last_token_only=True)
    assert got[0].tolist() == pytest.approx([0.0, 1 / 3, 1 / 3, 1 / 3])
    got = mean_received_attention(q, k, mask, last_token_only=False)  # rows see 1, 2, 3 keys
    expected = np.array([0.0, 1 + 1 / 2 + 1 / 3, 1 / 2 + 1 / 3, 1 / 3]) / 3
    np.testing.assert_allclose(got[0].numpy(), expected, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 2. FastV


def test_kept_count():
    assert [kept_count(r, 10) for r in (0.0, 0.25, 0.3, 0.5, 0.75, 0.99, 1.0)] == [10, 8, 7, 5, 3, 1, 0]
    assert kept_count(0.5, 7) == 4
    assert kept_count(0.29, 100) == 71
    assert kept_count(0.5, 0) == 0
    for n in range(0, 70):
        for ratio in (0.0, 0.25, 0.5, 0.75, 1.0):
            assert kept_count(ratio, n) == math.ceil((1 - ratio) * n)


@settings(max_examples=30)
@given(
    inputs=batches(),
    ratio=st.sampled_from([0.0, 0.25, 0.3, 0.5, 0.75, 0.9, 1.0]),
    scoring=st.sampled_from(["last_token", "all_tokens"]),
    positions=st.sampled_from(["original", "compact"]),
    padding_side=st.sampled_from(["left", "right"]),
)
def test_fastv_keeps_the_top_vision_tokens(inputs, ratio, scoring, positions, padding_side):
    method = FastV(2, ratio, scoring=scoring, positions=positions)
    assert method.reduce_layers == (2,)
    result = run_method(method, inputs, padding_side)
    scores = mean_received_attention(inputs["q"], inputs["k"], inputs["mask"], last_token_only=scoring == "last_token")
    keep = oracle_keep(scores.double().numpy(), inputs["spans"], ratio, inputs["mask"].numpy())
    check_drop_result(result, inputs, keep, positions, padding_side)
    for b, sample_spans in enumerate(inputs["spans"]):
        n = sum(s.num_mergeable() for s in sample_spans)
        structural = sum(s.length - s.num_mergeable() for s in sample_spans)
        vision_left = sum(s.length for s in result.spans[b])
        assert vision_left == expected_kept(ratio, n) + structural
        assert int(result.lengths[b]) == int(inputs["mask"][b].sum()) - (n - expected_kept(ratio, n))


def test_keep_top_vision_breaks_ties_by_lower_index():
    spans = [[VisionSpan(1, 5, 2, 2), VisionSpan(6, 10, 2, 2)], [VisionSpan(0, 4, 2, 2)]]
    scores = torch.tensor(
        [
            [9.0, 1.0, 2.0, 2.0, 0.5, 9.0, 2.0, 2.0, 1.0, 0.1, 9.0],
            [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        ]
    )
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 4:] = False
    # sample 0: 8 candidates keep 3 of the four tied 2.0s; sample 1: 4 tied candidates keep 2
    keep = keep_top_vision(scores, spans, 0.625, mask)
    assert keep[0].nonzero().squeeze(1).tolist() == [0, 2, 3, 5, 6, 10]
    assert keep[1].nonzero().squeeze(1).tolist() == [0, 1]
    assert keep_top_vision(scores, spans, 0.0, mask).tolist() == mask.tolist()


# ----------------------------------------------------------------------------------------------
# 3. RandomDrop


@settings(max_examples=20)
@given(
    inputs=batches(),
    ratio=st.sampled_from([0.0, 0.3, 0.5, 0.75, 1.0]),
    seed=st.integers(0, 1000),
    padding_side=st.sampled_from(["left", "right"]),
)
def test_random_drop_count_and_reproducibility(inputs, ratio, seed, padding_side):
    method = RandomDrop(0, ratio, seed=seed)
    result = run_method(method, inputs, padding_side)
    # documented draw: uniform scores from a generator seeded with ``seed`` at every call
    scores = torch.rand(inputs["hidden"].shape[:2], generator=torch.Generator().manual_seed(seed))
    keep = oracle_keep(scores.double().numpy(), inputs["spans"], ratio, inputs["mask"].numpy())
    check_drop_result(result, inputs, keep, "original", padding_side)
    again = run_method(method, inputs, padding_side)
    assert [t.tolist() for t in again.kept] == [t.tolist() for t in result.kept]
    assert torch.equal(again.hidden, result.hidden)


def test_random_drop_seeds_differ():
    inputs = one_image_batch()
    kept = {seed: run_method(RandomDrop(1, 0.5, seed=seed), inputs).kept[0].tolist() for seed in range(4)}
    assert all(len(k) == inputs["hidden"].shape[1] - 32 for k in kept.values())
    assert len({tuple(k) for k in kept.values()}) == 4
    # text tokens always survive
    assert all({0, 1, 2, 67, 68, 69, 70} <= set(k) for k in kept.values())
