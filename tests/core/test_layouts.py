"""Image layouts: every family's pieces, and their placement on the placeholder tokens."""

from __future__ import annotations

import torch

from lightkv_core import layouts
from lightkv_core.spans import VisionSpan, check_sample_spans


def test_llava_image_with_and_without_its_cls_token():
    (plain,) = layouts.llava_image(24)
    assert (plain.length, plain.rows, plain.cols, plain.coords) == (576, 24, 24, None)
    (with_cls,) = layouts.llava_image(24, leading_cls=True)
    assert with_cls.length == 577 and not bool(with_cls.mergeable[0]) and int(with_cls.mergeable.sum()) == 576
    assert with_cls.coords[1:].tolist() == list(range(576))


def test_llava_next_single_tile_is_its_base_grid_and_one_newline():
    (piece,) = layouts.llava_next_image(24, None)
    assert piece.length == 577 and (piece.rows, piece.cols) == (24, 24)
    assert piece.mergeable.tolist() == [True] * 576 + [False]
    assert piece.coords[:576].tolist() == list(range(576))


def test_llava_next_anyres_is_base_grid_then_unpadded_grid_with_row_newlines():
    base, high = layouts.llava_next_image(24, (36, 48))
    assert (base.length, base.rows, base.cols) == (576, 24, 24)
    assert (high.length, high.rows, high.cols) == (36 * 49, 36, 48)
    newlines = ~high.mergeable
    assert int(newlines.sum()) == 36 and bool(newlines.view(36, 49)[:, -1].all())
    assert high.coords[high.mergeable].tolist() == list(range(36 * 48))


def test_qwen_vl_item_is_one_grid_per_temporal_patch():
    pieces = layouts.qwen_vl_item(3, 28, 42, 2)
    assert [(p.rows, p.cols, p.length) for p in pieces] == [(14, 21, 294)] * 3
    assert layouts.num_tokens(pieces) == 3 * 294


def test_place_lays_pieces_back_to_back_and_they_validate():
    pieces = layouts.llava_next_image(4, (6, 8))
    placed = layouts.place(pieces, 10)
    assert [(s.start, s.end) for s in placed] == [(10, 26), (26, 26 + 6 * 9)]
    assert all(isinstance(s, VisionSpan) for s in placed)
    check_sample_spans(placed, 26 + 6 * 9 + 3)  # a valid sample: grids, coords and newlines consistent
    assert torch.equal(placed[1].coords, pieces[1].coords)
