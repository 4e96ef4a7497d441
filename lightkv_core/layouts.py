"""Image layouts: the vision-span pieces each supported model family gives one image, shared by every adapter.

A *piece* is a :class:`~lightkv_core.spans.VisionSpan` template starting at 0; an image is a list of pieces that
fill consecutive placeholder tokens (:func:`place`). The grids are those the language model sees, after the
vision tower's own merging; each adapter reads the numbers (grid size, tiles, unpadded shape) from its framework's
inputs and builds the pieces here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from lightkv_core.spans import VisionSpan


def grid(rows: int, cols: int) -> VisionSpan:
    """A plain ``rows x cols`` grid, raster order."""
    return VisionSpan(0, rows * cols, rows, cols)


def grid_with_row_newlines(rows: int, cols: int, start: int = 0) -> VisionSpan:
    """A ``rows x cols`` image laid out row by row, each row followed by a structural newline token (never
    merged), as LLaVA-NeXT lays out its unpadded high-resolution grid: ``rows * (cols + 1)`` tokens from
    ``start``."""
    raster = torch.arange(rows * cols).view(rows, cols)
    coords = torch.cat([raster, torch.full((rows, 1), -1)], dim=1).flatten()
    return VisionSpan(start, start + coords.numel(), rows, cols, coords, coords >= 0)


def llava_image(side: int, leading_cls: bool = False) -> list[VisionSpan]:
    """LLaVA-1.5: one ``side x side`` grid; with ``leading_cls`` (``vision_feature_select_strategy="full"``) a
    structural CLS token leads it."""
    if not leading_cls:
        return [grid(side, side)]
    coords = torch.cat([torch.tensor([-1]), torch.arange(side * side)])
    return [VisionSpan(0, side * side + 1, side, side, coords, coords >= 0)]


def llava_next_image(side: int, unpadded: tuple[int, int] | None) -> list[VisionSpan]:
    """LLaVA-NeXT (anyres, spatial unpad): the ``side x side`` base grid, then the unpadded high-resolution grid
    ``unpadded = (rows, cols)`` with a newline token after every row; an image of a single tile (``unpadded`` is
    ``None``) is its base grid followed by one newline token."""
    if unpadded is None:
        coords = torch.cat([torch.arange(side * side), torch.tensor([-1])])
        return [VisionSpan(0, side * side + 1, side, side, coords, coords >= 0)]
    return [grid(side, side), grid_with_row_newlines(*unpadded)]


def qwen_vl_item(frames: int, height: int, width: int, merge: int) -> list[VisionSpan]:
    """Qwen2-VL / Qwen2.5-VL: an image or video of ``grid_thw = (frames, height, width)`` patches; each temporal
    patch (a still image has one) is its own ``height // merge x width // merge`` grid after the spatial merger."""
    return [grid(height // merge, width // merge) for _ in range(frames)]


def num_tokens(pieces: Sequence[VisionSpan]) -> int:
    """Tokens an image of these pieces takes."""
    return sum(piece.length for piece in pieces)


def place(pieces: Sequence[VisionSpan], start: int) -> list[VisionSpan]:
    """The pieces laid back to back from token ``start``."""
    spans = []
    for piece in pieces:
        spans.append(replace(piece, start=start, end=start + piece.length))
        start += piece.length
    return spans
