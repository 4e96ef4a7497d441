"""Inputs and checks shared by the tests of the token-dropping methods (FastV, RandomDrop) and ``drop_tokens``.

A Hypothesis strategy of padded batches with images, a one-image batch, a call of a method's ``reduce`` on such
a batch, and the check that a drop result keeps exactly the expected tokens (rows, positions and spans carried).
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

from lightkv_core import VisionSpan
from lightkv_core.methods import PrefillReduction


def padded_mask(lengths: list[int], seq: int, left: bool) -> torch.Tensor:
    """``(B, S)`` bool mask of samples of ``lengths`` real tokens, padded on the left or right."""
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


def check_drop_result(result, inputs: dict, keep: np.ndarray, mode: str, padding_side: str) -> None:
    """The result of a drop keeps exactly ``keep`` (B, S): rows unchanged, positions and spans carried. A drop of
    nothing returns the input as it is: same shape, padding where it was."""
    hidden, position_ids = inputs["hidden"], inputs["position_ids"]
    batch = hidden.shape[0]
    real = inputs["mask"].numpy()
    if (keep == real).all():
        check_unchanged(result, inputs, mode)
        return
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


def check_unchanged(result, inputs: dict, mode: str) -> None:
    """``result`` of a stage or drop that removed nothing: the input hidden states themselves, every real token in
    its place, positions as given (``"compact"``: each real token's ordinal), spans unchanged."""
    hidden, real = inputs["hidden"], inputs["mask"]
    assert result.hidden is hidden
    index = torch.arange(hidden.shape[1]).expand(hidden.shape[0], -1)
    assert torch.equal(result.kept_padded, torch.where(real, index, -1))
    assert result.lengths.tolist() == real.sum(dim=1).tolist()
    assert bool((result.merged_into == -1).all())
    expected = inputs["position_ids"] if mode == "original" else torch.cumsum(real.long(), dim=1) - 1
    assert torch.equal(result.positions, torch.where(real, expected, 0))
    assert [[(s.start, s.end) for s in sample] for sample in result.spans] == [
        [(s.start, s.end) for s in sample] for sample in inputs["spans"]
    ]


def one_image_batch(seed: int = 0, side: int = 8) -> dict:
    """One sample: 3 text tokens, a ``side x side`` image, 4 text tokens, with random tensors."""
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


def run_method(method: PrefillReduction, inputs: dict, padding_side: str = "right", layer: int | None = None):
    """``method.reduce`` on ``inputs`` at ``layer`` (default: the method's first layer)."""
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
