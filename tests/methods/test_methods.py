"""The token-dropping baselines (FastV, RandomDrop), their shared pieces, and the method interface."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightkv_core import LightKVConfig, VisionSpan, drop_tokens, lightkv_stage
from lightkv_core.methods import FastV, LightKV, PrefillReduction, RandomDrop, mean_received_attention
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
# Random inputs


def padded_mask(lengths: list[int], seq: int, left: bool) -> torch.Tensor:
    mask = torch.zeros(len(lengths), seq, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if left:
            mask[b, seq - n :] = True
        else:
            mask[b, :n] = True
    return mask


@st.composite
def batches(draw: st.DrawFn, max_images: int = 2, max_side: int = 6) -> dict:
    """A padded batch of samples with text runs, images (some with structural tokens) and random tensors."""
    batch = draw(st.integers(1, 3))
    samples = []
    for _ in range(batch):
        images = []
        for _ in range(draw(st.integers(0, max_images))):
            rows, cols = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
            structural = draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
            images.append((draw(st.integers(0, 3)), rows, cols, structural if draw(st.booleans()) else None))
        samples.append((images, draw(st.integers(1, 4))))
    lengths = [sum(t + r * c for t, r, c, _ in images) + tail for images, tail in samples]
    seq = max(lengths) + draw(st.integers(0, 2))
    left = draw(st.booleans())
    spans = []
    for (images, _), n in zip(samples, lengths, strict=True):
        position = seq - n if left else 0
        sample_spans = []
        for text, rows, cols, structural in images:
            position += text
            mergeable = None if structural is None else ~torch.tensor(structural, dtype=torch.bool)
            sample_spans.append(VisionSpan(position, position + rows * cols, rows, cols, mergeable=mergeable))
            position += rows * cols
        spans.append(sample_spans)
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(1, 2))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    head_dim, dim = 4, 6
    return dict(
        hidden=torch.randn(batch, seq, dim, generator=generator),
        q=2 * torch.randn(batch, heads, seq, head_dim, generator=generator),
        k=2 * torch.randn(batch, kv_heads, seq, head_dim, generator=generator),
        position_ids=torch.randint(0, 1000, (batch, seq), generator=generator),
        mask=padded_mask(lengths, seq, left),
        spans=spans,
        left=left,
    )


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


def check_drop_result(result, inputs: dict, keep: np.ndarray, mode: str, padding_side: str) -> None:
    """The result of a drop keeps exactly ``keep`` (B, S): rows unchanged, positions and spans carried."""
    hidden, position_ids = inputs["hidden"], inputs["position_ids"]
    batch = hidden.shape[0]
    lengths = keep.sum(axis=1)
    assert result.lengths.tolist() == lengths.tolist()
    out_len = int(lengths.max())
    assert result.hidden.shape == (batch, out_len, hidden.shape[2])
    assert result.scores is None
    assert bool((result.merged_into == -1).all())
    for b in range(batch):
        kept = np.nonzero(keep[b])[0]
        assert result.kept[b].tolist() == kept.tolist()
        pad = out_len - len(kept)
        real = slice(pad, out_len) if padding_side == "left" else slice(0, len(kept))
        padding = torch.ones(out_len, dtype=torch.bool)
        padding[real] = False
        assert torch.equal(result.hidden[b, real], hidden[b, torch.from_numpy(kept)])
        assert bool((result.hidden[b, padding] == 0).all())
        assert result.kept_padded[b, real].tolist() == kept.tolist()
        assert bool((result.kept_padded[b, padding] == -1).all())
        if mode == "original":
            assert result.positions[b, real].tolist() == position_ids[b, torch.from_numpy(kept)].tolist()
        else:
            assert result.positions[b, real].tolist() == list(range(len(kept)))
        assert bool((result.positions[b, padding] == 0).all())
        offset = pad if padding_side == "left" else 0
        for old, new in zip(inputs["spans"][b], result.spans[b], strict=True):
            survivors = [i for i in range(old.start, old.end) if keep[b, i]]
            assert new.start == offset + int(keep[b, : old.start].sum())
            assert new.end == new.start + len(survivors)
            assert (new.rows, new.cols) == (old.rows, old.cols)
            local = torch.tensor([i - old.start for i in survivors], dtype=torch.long)
            assert new.coords_or_default().tolist() == old.coords_or_default()[local].tolist()
            assert new.mergeable_or_default().tolist() == old.mergeable_or_default()[local].tolist()
            # a survivor's new slot holds the row of the old one
            for i, slot in zip(survivors, range(new.start, new.end), strict=True):
                assert torch.equal(result.hidden[b, slot], hidden[b, i])


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
    result = run(method, inputs, padding_side)
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


def one_image_batch(seed: int = 0, side: int = 8) -> dict:
    generator = torch.Generator().manual_seed(seed)
    seq = side * side + 7
    return dict(
        hidden=torch.randn(1, seq, 8, generator=generator),
        q=torch.randn(1, 2, seq, 4, generator=generator),
        k=torch.randn(1, 1, seq, 4, generator=generator),
        position_ids=torch.arange(seq)[None],
        mask=torch.ones(1, seq, dtype=torch.bool),
        spans=[[VisionSpan(3, 3 + side * side, side, side)]],
    )


def run(method: PrefillReduction, inputs: dict, padding_side: str = "right", layer: int | None = None):
    return method.reduce(
        method.reduce_layers[0] if layer is None else layer,
        inputs["hidden"],
        inputs["q"],
        inputs["k"],
        inputs["spans"],
        position_ids=inputs["position_ids"],
        attention_mask=inputs["mask"],
        padding_side=padding_side,
    )


@settings(max_examples=20)
@given(
    inputs=batches(),
    ratio=st.sampled_from([0.0, 0.3, 0.5, 0.75, 1.0]),
    seed=st.integers(0, 1000),
    padding_side=st.sampled_from(["left", "right"]),
)
def test_random_drop_count_and_reproducibility(inputs, ratio, seed, padding_side):
    method = RandomDrop(0, ratio, seed=seed)
    result = run(method, inputs, padding_side)
    # documented draw: uniform scores from a generator seeded with ``seed`` at every call
    scores = torch.rand(inputs["hidden"].shape[:2], generator=torch.Generator().manual_seed(seed))
    keep = oracle_keep(scores.double().numpy(), inputs["spans"], ratio, inputs["mask"].numpy())
    check_drop_result(result, inputs, keep, "original", padding_side)
    again = run(method, inputs, padding_side)
    assert [t.tolist() for t in again.kept] == [t.tolist() for t in result.kept]
    assert torch.equal(again.hidden, result.hidden)


def test_random_drop_seeds_differ():
    inputs = one_image_batch()
    kept = {seed: run(RandomDrop(1, 0.5, seed=seed), inputs).kept[0].tolist() for seed in range(4)}
    assert all(len(k) == inputs["hidden"].shape[1] - 32 for k in kept.values())
    assert len({tuple(k) for k in kept.values()}) == 4
    # text tokens always survive
    assert all({0, 1, 2, 67, 68, 69, 70} <= set(k) for k in kept.values())


# ----------------------------------------------------------------------------------------------
# 4. drop_tokens


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("positions", ["original", "compact"])
def test_drop_tokens_carries_spans_and_positions(padding_side, positions):
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 12, 4, generator=generator)
    coords = torch.tensor([5, 0, 3, 8, 1, 2])
    mergeable = torch.tensor([True, True, False, True, True, True])
    spans = [
        [VisionSpan(2, 8, 3, 3, coords=coords, mergeable=mergeable), VisionSpan(8, 12, 2, 2)],
        [VisionSpan(6, 10, 2, 2)],
    ]
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :3] = False  # sample 1 left-padded
    keep = torch.zeros(2, 12, dtype=torch.bool)
    keep[0, [0, 1, 3, 4, 7, 9]] = True
    keep[1, [0, 1, 2, 3, 5, 6, 9, 10, 11]] = True  # keep on padding (0..2) is ignored
    inputs = dict(hidden=hidden, position_ids=torch.arange(100, 124).view(2, 12), mask=mask, spans=spans)
    result = drop_tokens(
        hidden,
        keep,
        spans,
        positions=positions,
        position_ids=inputs["position_ids"],
        attention_mask=mask,
        padding_side=padding_side,
    )
    check_drop_result(result, inputs, (keep & mask).numpy(), positions, padding_side)
    assert result.lengths.tolist() == [6, 6]
    assert result.spans[0][0].coords.tolist() == [0, 3, 2]
    assert result.spans[0][0].mergeable.tolist() == [True, False, True]
    assert result.spans[0][1].coords.tolist() == [1]
    assert result.spans[1][0].coords.tolist() == [0, 3]
    assert [(s.start, s.end) for s in result.spans[1]] == [(2, 4)]


def test_drop_tokens_single_sample_form():
    hidden = torch.randn(1, 6, 3)
    keep = torch.tensor([[True, False, True, True, False, True]])
    result = drop_tokens(hidden, keep, [(1, 5, 2, 2)])
    assert result.kept.tolist() == [0, 2, 3, 5]
    assert [(s.start, s.end, s.coords.tolist()) for s in result.spans] == [(1, 3, [1, 2])]
    assert result.positions.tolist() == [[0, 2, 3, 5]]


def test_drop_tokens_rejects_bad_inputs():
    hidden = torch.randn(2, 5, 3)
    spans = [[], []]
    keep = torch.ones(2, 5, dtype=torch.bool)
    for bad in (keep.long(), keep.float(), keep[:, :4], keep[:1], keep[0], keep.tolist()):
        with pytest.raises(ValueError, match="keep"):
            drop_tokens(hidden, bad, spans)
    with pytest.raises(ValueError):
        drop_tokens(hidden, keep, spans, padding_side="middle")
    with pytest.raises(ValueError):
        drop_tokens(hidden[0], keep[0], [])
    with pytest.raises(ValueError):
        drop_tokens(hidden, keep, spans, positions="shuffled")
    with pytest.raises(ValueError):
        drop_tokens(hidden, keep, [[(3, 7, 2, 2)], []])  # span runs past the sequence


# ----------------------------------------------------------------------------------------------
# 5./6. Constructors and the schedule


@pytest.mark.parametrize(
    "make",
    [
        lambda: FastV(0, -0.1),
        lambda: FastV(0, 1.5),
        lambda: FastV(-1, 0.5),
        lambda: FastV(0, 0.5, scoring="max"),
        lambda: RandomDrop(0, -0.01),
        lambda: RandomDrop(0, 1.01),
        lambda: RandomDrop(-2, 0.5),
    ],
)
def test_constructor_validation(make):
    with pytest.raises(ValueError):
        make()


def test_valid_constructors_and_interface():
    for method in (
        FastV(0, 0.0),
        FastV(3, 1.0, scoring="all_tokens"),
        RandomDrop(0, 0.5),
        LightKV(LightKVConfig.preset("llava-1.5")),
    ):
        assert isinstance(method, PrefillReduction)
    assert LightKV(LightKVConfig((1, 3), (2, 1), (0.5, 0.5))).reduce_layers == (1, 3)
    assert RandomDrop(4, 0.5).reduce_layers == (4,)


def test_lightkv_reduce_matches_the_stage_and_rejects_other_layers():
    inputs = one_image_batch(seed=3)
    method = LightKV(LightKVConfig((1, 3), (2, 1), (0.5, 0.25)), backend="torch")
    for layer, window, ratio in ((1, 2, 0.5), (3, 1, 0.25)):
        got = run(method, inputs, "left", layer)
        expected = lightkv_stage(
            inputs["hidden"],
            inputs["q"],
            inputs["k"],
            inputs["spans"],
            window,
            ratio,
            position_ids=inputs["position_ids"],
            padding_side="left",
            backend="torch",
        )
        assert torch.equal(got.hidden, expected.hidden)
        assert got.lengths.tolist() == expected.lengths.tolist() == [71 - int(64 * ratio)]
    for layer in (0, 2, 4):
        with pytest.raises(ValueError, match="merge_layers"):
            run(method, inputs, "left", layer)


@pytest.mark.parametrize("method", [FastV(0, 0.5), RandomDrop(0, 0.5)], ids=["fastv", "random"])
@pytest.mark.parametrize("form", ["batch", "single"])
def test_dropping_methods_accept_tuple_spans(method, form):
    inputs = one_image_batch()
    span = (3, 67, 8, 8)
    inputs["spans"] = [[span]] if form == "batch" else [span]
    result = run(method, inputs)
    assert int(result.lengths[0]) == inputs["hidden"].shape[1] - 32


@pytest.mark.parametrize("cls", [FastV, RandomDrop])
def test_dropping_methods_check_positions_and_layer(cls):
    with pytest.raises(ValueError, match="positions must be one of"):
        cls(0, 0.5, positions="bad")
    inputs = one_image_batch()
    with pytest.raises(ValueError, match="layer 1 is not one of this method's layers"):
        run(cls(0, 0.5), inputs, "left", layer=1)
