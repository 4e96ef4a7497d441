"""Batches: different spans, padding and survivor counts give each sample what it gets alone."""

from __future__ import annotations

import torch
from helpers.stage_cases import build_case, image_layouts
from hypothesis import given, settings
from hypothesis import strategies as st

from lightkv_core import lightkv_stage


def pad(t: torch.Tensor, length: int, left: bool, dim: int) -> torch.Tensor:
    """Zero-pad ``t`` to ``length`` along ``dim``."""
    missing = length - t.shape[dim]
    shape = list(t.shape)
    shape[dim] = missing
    filler = torch.zeros(shape, dtype=t.dtype)
    return torch.cat([filler, t] if left else [t, filler], dim=dim)


@settings(max_examples=12)
@given(
    layouts=st.lists(image_layouts(max_images=2, min_side=4, max_side=10), min_size=2, max_size=3),
    seed=st.integers(0, 2**32 - 1),
    left_in=st.booleans(),
    left_out=st.booleans(),
    mode=st.sampled_from(["default", "reference"]),
)
def test_batch_equals_samples_alone(backend, device, layouts, seed, left_in, left_out, mode):
    cases = [
        build_case(layout, seed=seed + i, window=2, ratio=0.5, dim=12, heads=4, kv_heads=2, head_dim=8)
        for i, layout in enumerate(layouts)
    ]
    seq = max(c.hidden.shape[1] for c in cases)
    offsets = [seq - c.hidden.shape[1] if left_in else 0 for c in cases]
    hidden = torch.cat([pad(c.hidden, seq, left_in, 1) for c in cases])
    q = torch.cat([pad(c.q, seq, left_in, 2) for c in cases])
    k = torch.cat([pad(c.k, seq, left_in, 2) for c in cases])
    mask = torch.stack([pad(torch.ones(c.hidden.shape[1], dtype=torch.bool), seq, left_in, 0) for c in cases])
    spans = [
        [
            (s.start + off, s.end + off, s.rows, s.cols)
            if s.coords is None and s.mergeable is None
            else type(s)(s.start + off, s.end + off, s.rows, s.cols, s.coords, s.mergeable)
            for s in c.spans
        ]
        for c, off in zip(cases, offsets, strict=True)
    ]
    hidden_in = hidden.to(device)
    batch = lightkv_stage(
        hidden_in,
        q.to(device),
        k.to(device),
        spans,
        2,
        0.5,
        attention_mask=mask.to(device),
        layout=mode,
        padding_side="left" if left_out else "right",
        backend=backend,
    )
    out_len = batch.hidden.shape[1]
    for b, (case, off) in enumerate(zip(cases, offsets, strict=True)):
        alone = lightkv_stage(
            case.hidden.to(device),
            case.q.to(device),
            case.k.to(device),
            case.spans,
            2,
            0.5,
            layout=mode,
            backend=backend,
        )
        length = int(batch.lengths[b])
        assert length == alone.hidden.shape[1]
        unchanged = batch.hidden is hidden_in  # nothing merged in any sample: the input's own layout
        shift = off if unchanged else out_len - length if left_out else 0
        real = slice(shift, shift + length)
        torch.testing.assert_close(batch.hidden[b, real], alone.hidden[0], rtol=1e-5, atol=1e-6)
        padding = torch.ones(out_len, dtype=torch.bool)
        padding[real] = False
        assert unchanged or torch.all(batch.hidden[b, padding] == 0)
        assert torch.all(batch.kept_padded[b, padding] == -1)
        assert (batch.kept[b] - off).tolist() == alone.kept.tolist()
        assert batch.positions[b, real].tolist() == alone.positions[0].tolist()
        assert [(s.start - shift, s.end - shift) for s in batch.spans[b]] == [(s.start, s.end) for s in alone.spans]
        assert [s.coords_or_default().tolist() for s in batch.spans[b]] == [
            s.coords_or_default().tolist() for s in alone.spans
        ]


def test_sample_without_images_is_untouched(device):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 80, 8, generator=generator)
    q, k = torch.randn(2, 2, 80, 8, generator=generator), torch.randn(2, 1, 80, 8, generator=generator)
    out = lightkv_stage(hidden.to(device), q.to(device), k.to(device), [[(5, 69, 8, 8)], []], 2, 0.5)
    assert out.lengths.tolist() == [80 - 32, 80]
    assert torch.equal(out.hidden[1].cpu(), hidden[1])
    assert out.kept[1].tolist() == list(range(80))
