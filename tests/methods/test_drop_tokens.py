"""``drop_tokens``, the shared step of the dropping methods: it carries spans (coords, mergeable flags) and
positions to the survivors, accepts the single-sample form, and rejects bad inputs."""

from __future__ import annotations

import pytest
import torch
from helpers.drop_cases import check_drop_result

from lightkv_core import VisionSpan, drop_tokens

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------------------
# drop_tokens


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
