"""The whole LightKV stage against the float64 oracle, plus its invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.oracle import oracle_stage
from helpers.stage_cases import Case, as_numpy, build_case, image_layouts, oracle_spans
from hypothesis import event, given, settings
from hypothesis import strategies as st

from lightkv_core import VisionSpan, lightkv_stage, num_merged
from lightkv_core.windows import band_of

DTYPES = st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16])
HEADS = st.sampled_from([(4, 2), (2, 2), (4, 1), (6, 3)])
RATIOS = st.sampled_from([0.0, 0.5, 0.5, 0.25, 0.3, 1.0]) | st.floats(0.0, 1.0)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def run_both(case: Case, backend: str, device: str, **kwargs) -> tuple:
    result = lightkv_stage(
        case.hidden.to(device),
        case.q.to(device),
        case.k.to(device),
        case.spans,
        case.window,
        case.ratio,
        backend=backend,
        **kwargs,
    )
    oracle_kwargs = {"positions_mode" if key == "positions" else key: value for key, value in kwargs.items()}
    expected = oracle_stage(
        as_numpy(case.hidden),
        as_numpy(case.q),
        as_numpy(case.k),
        oracle_spans(case.spans),
        case.window,
        case.ratio,
        **oracle_kwargs,
    )
    return result, expected


def assert_matches(result, expected: dict, dtype: torch.dtype) -> None:
    assert result.kept.tolist() == expected["kept"]
    merges = {a: b for a, b in enumerate(result.merged_into[0].tolist()) if b >= 0}
    assert merges == expected["merges"]
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(result.hidden[0].double().cpu().numpy(), expected["hidden"], rtol=tol, atol=tol)
    assert result.positions[..., 0, :].cpu().numpy().tolist() == expected["positions"].tolist()
    got_spans = oracle_spans(result.spans)
    assert got_spans == expected["spans"]
    assert int(result.lengths[0]) == len(expected["kept"]) == result.hidden.shape[1]


@settings(max_examples=30)
@given(
    layout=st.one_of(image_layouts(min_images=1, min_side=5, max_side=16), image_layouts()),
    seed=st.integers(0, 2**32 - 1),
    window=st.integers(1, 3),
    ratio=RATIOS,
    heads=HEADS,
    head_dim=st.sampled_from([8, 16, 24]),
    dim=st.integers(4, 40),
    dtype=DTYPES,
    guide=st.sampled_from(["all_text", "prompt", "none"]),
    mode=st.sampled_from(["default", "reference"]),
    positions=st.sampled_from([None, "original", "compact"]),
)
def test_stage_matches_oracle(
    backend, device, layout, seed, window, ratio, heads, head_dim, dim, dtype, guide, mode, positions
):
    case = build_case(
        layout,
        seed=seed,
        window=window,
        ratio=ratio,
        dim=dim,
        heads=heads[0],
        kv_heads=heads[1],
        head_dim=head_dim,
        dtype=dtype,
    )
    result, expected = run_both(case, backend, device, guide=guide, layout=mode, positions=positions)
    event(f"merges anything: {bool(expected['merges'])}")
    assert_matches(result, expected, dtype)


@settings(max_examples=20)
@given(
    layout=image_layouts(min_images=1, min_side=4, max_side=14),
    seed=st.integers(0, 2**32 - 1),
    window=st.integers(1, 3),
    palette=st.integers(1, 4),
    mode=st.sampled_from(["default", "reference"]),
)
def test_stage_ties_follow_the_spec(backend, device, layout, seed, window, palette, mode):
    """Hidden rows drawn from a few +-1 vectors make exact similarity ties everywhere: best B and the
    chosen A tokens must follow the lowest-position rule exactly as the oracle does."""
    case = build_case(
        layout, seed=seed, window=window, ratio=0.5, dim=8, heads=2, kv_heads=1, head_dim=8, palette=palette
    )
    result, expected = run_both(case, backend, device, layout=mode)
    assert_matches(result, expected, torch.float32)


@pytest.mark.parametrize("layout, expected", [("default", [288, 144, 72]), ("reference", [288, 145, 73])])
def test_llava_schedule_token_counts(layout, expected, device):
    """LLaVA-1.5: one 24x24 image, stages W = 4, 2, 1 at rho = 0.5."""
    generator = torch.Generator().manual_seed(0)
    text_before, text_after = 35, 20
    seq = text_before + 576 + text_after
    hidden = torch.randn(1, seq, 16, generator=generator)
    spans = [(text_before, text_before + 576)]
    counts = []
    for window in (4, 2, 1):
        length = hidden.shape[1]
        q = torch.randn(1, 4, length, 8, generator=generator)
        k = torch.randn(1, 2, length, 8, generator=generator)
        out = lightkv_stage(hidden.to(device), q.to(device), k.to(device), spans, window, 0.5, layout=layout)
        hidden, spans = out.hidden.cpu(), out.spans
        counts.append(spans[0].length)
        assert hidden.shape[1] == text_before + spans[0].length + text_after
    assert counts == expected
    if layout == "reference":
        assert out.positions[0].tolist() == list(range(hidden.shape[1]))


@settings(max_examples=25)
@given(layout=image_layouts(max_images=2), seed=st.integers(0, 2**32 - 1), dtype=DTYPES)
def test_ratio_zero_returns_input_unchanged(layout, seed, dtype, device):
    case = build_case(layout, seed=seed, window=2, ratio=0.0, dim=12, heads=2, kv_heads=2, head_dim=8, dtype=dtype)
    result = lightkv_stage(case.hidden.to(device), case.q.to(device), case.k.to(device), case.spans, 2, 0.0)
    assert torch.equal(result.hidden.cpu(), case.hidden)
    assert result.kept.tolist() == list(range(case.hidden.shape[1]))
    assert result.positions[0].tolist() == list(range(case.hidden.shape[1]))
    assert result.scores is None


def windows_of(span: VisionSpan, window: int) -> dict[int, list[int]]:
    """Sequence indices of each window's mergeable tokens (default layout), straight from the spec."""

    def band(index: int, length: int) -> int:
        edges, start = [], 0
        for b in range(window):
            start += length // window + (1 if b < length % window else 0)
            edges.append(start)
        return next(b for b, edge in enumerate(edges) if index < edge)

    windows: dict[int, list[int]] = {}
    coords = span.coords_or_default().tolist()
    for offset, (coord, mergeable) in enumerate(zip(coords, span.mergeable_or_default().tolist(), strict=True)):
        if mergeable:
            row, col = divmod(coord, span.cols)
            key = band(row, span.rows) * window + band(col, span.cols)
            windows.setdefault(key, []).append(span.start + offset)
    return windows


@settings(max_examples=25)
@given(
    layout=image_layouts(min_images=1, min_side=3, max_side=14),
    seed=st.integers(0, 2**32 - 1),
    window=st.integers(1, 3),
    ratio=RATIOS,
)
def test_survivors_per_window_and_convexity(layout, seed, window, ratio, device):
    case = build_case(layout, seed=seed, window=window, ratio=ratio, dim=10, heads=2, kv_heads=1, head_dim=8)
    result = lightkv_stage(case.hidden.to(device), case.q.to(device), case.k.to(device), case.spans, window, ratio)
    kept = set(result.kept.tolist())
    merged_into = result.merged_into[0].cpu()
    for span in case.spans:
        merges = span.num_mergeable() >= 8 * window * window
        for tokens in windows_of(span, window).values():
            n = len(tokens)
            survivors = sum(t in kept for t in tokens)
            assert survivors == (n - num_merged(ratio, n) if merges else n)
            for t in tokens:  # merges never leave the window
                assert int(merged_into[t]) == -1 or int(merged_into[t]) in tokens
    # every output row lies in the convex hull of its group (coordinate-wise bounds)
    hidden = case.hidden[0]
    for slot, token in enumerate(result.kept.tolist()):
        group = [token] + (merged_into == token).nonzero().squeeze(1).tolist()
        low, high = hidden[group].min(0).values, hidden[group].max(0).values
        row = result.hidden[0, slot].cpu()
        assert torch.all(row >= low - 1e-5) and torch.all(row <= high + 1e-5)


@settings(max_examples=20)
@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(6, 12), cols=st.integers(6, 12))
def test_a_window_does_not_depend_on_other_windows(seed, rows, cols, device):
    """Changing the hidden states of every token outside one window leaves that window's merges and
    merged vectors unchanged (q and k, hence the weights, are kept)."""
    layout = dict(
        images=[dict(rows=rows, cols=cols, keep_fraction=1.0, shuffle=False, structural_fraction=0.0)],
        texts=[3, 4],
    )
    case = build_case(layout, seed=seed, window=2, ratio=0.5, dim=8, heads=2, kv_heads=2, head_dim=8)
    span = case.spans[0]
    windows = windows_of(span, 2)
    inside = windows[0]
    others = [t for key, tokens in windows.items() if key != 0 for t in tokens]
    changed = case.hidden.clone()
    changed[0, others] = torch.randn(len(others), 8, generator=torch.Generator().manual_seed(seed % 1000))

    def run(hidden: torch.Tensor):
        return lightkv_stage(hidden.to(device), case.q.to(device), case.k.to(device), case.spans, 2, 0.5)

    first, second = run(case.hidden), run(changed)
    assert first.merged_into[0, inside].tolist() == second.merged_into[0, inside].tolist()
    for token in inside:
        if token in first.kept.tolist():
            a = first.hidden[0, first.kept.tolist().index(token)]
            b = second.hidden[0, second.kept.tolist().index(token)]
            assert torch.equal(a, b)


def test_structural_tokens_are_never_merged(device):
    """LLaVA-NeXT style: a 12x12 grid with a non-mergeable newline token after every row."""
    rows = cols = 12
    coords, mergeable = [], []
    for r in range(rows):
        coords += [r * cols + c for c in range(cols)] + [r * cols]
        mergeable += [True] * cols + [False]
    span = VisionSpan(2, 2 + len(coords), rows, cols, torch.tensor(coords), torch.tensor(mergeable))
    seq = span.end + 5
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, seq, 16, generator=generator)
    q, k = torch.randn(1, 2, seq, 8, generator=generator), torch.randn(1, 2, seq, 8, generator=generator)
    out = lightkv_stage(hidden.to(device), q.to(device), k.to(device), [span], 2, 0.5)
    newlines = [span.start + i for i, m in enumerate(mergeable) if not m]
    kept = out.kept.tolist()
    assert all(t in kept for t in newlines)
    assert not set(out.merged_into[0].tolist()) & set(newlines)
    new_span = out.spans[0]
    assert int((~new_span.mergeable).sum()) == rows
    assert new_span.length == rows + rows * cols - 4 * num_merged(0.5, 36)


def test_small_image_skipped_others_merge(device):
    """Default layout: an image under 8*W*W mergeable tokens stays; the reference layout skips the sample."""
    generator = torch.Generator().manual_seed(2)
    spans = [(1, 1 + 64, 8, 8), (70, 70 + 16, 4, 4)]  # 64 >= 32 merges at W=2, 16 < 32 does not
    seq = 90
    hidden = torch.randn(1, seq, 8, generator=generator)
    q, k = torch.randn(1, 2, seq, 8, generator=generator), torch.randn(1, 2, seq, 8, generator=generator)
    args = (hidden.to(device), q.to(device), k.to(device), spans, 2, 0.5)
    default = lightkv_stage(*args)
    assert [s.length for s in default.spans] == [32, 16]
    reference = lightkv_stage(*args, layout="reference")
    assert [s.length for s in reference.spans] == [64, 16]
    assert reference.positions[0].tolist() == list(range(seq))


def test_mrope_positions_travel_with_survivors(device):
    generator = torch.Generator().manual_seed(3)
    seq = 4 + 64 + 3
    hidden = torch.randn(1, seq, 8, generator=generator)
    q, k = torch.randn(1, 2, seq, 8, generator=generator), torch.randn(1, 2, seq, 8, generator=generator)
    position_ids = torch.stack([torch.arange(seq), torch.arange(seq) * 2, torch.arange(seq) * 3])[:, None]
    out = lightkv_stage(hidden, q, k, [(4, 68, 8, 8)], 2, 0.5, position_ids=position_ids)
    kept = out.kept
    assert out.positions.shape == (3, 1, kept.numel())
    assert torch.equal(out.positions[:, 0].cpu(), position_ids[:, 0, kept.cpu()])
    compact = lightkv_stage(hidden, q, k, [(4, 68, 8, 8)], 2, 0.5, position_ids=position_ids, positions="compact")
    assert torch.equal(compact.positions[:, 0], torch.arange(kept.numel()).expand(3, -1))


def test_band_of_splits_near_equally():
    for length in range(1, 30):
        for bands in range(1, 8):
            assigned = band_of(torch.arange(length), length, bands).tolist()
            sizes = [assigned.count(b) for b in range(bands)]
            assert sizes == [length // bands + (1 if b < length % bands else 0) for b in range(bands)]
            assert assigned == sorted(assigned)
