"""Vision spans: where each image's tokens sit in the current sequence, and their grid."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class VisionSpan:
    """One image's tokens in the current sequence.

    Attributes:
        start: index of the image's first token in the current sequence.
        end: one past its last token (exclusive).
        rows, cols: the image's original token grid (e.g. 24x24 for LLaVA-1.5, (h/2, w/2) for
            Qwen2.5-VL after its 2x2 patch merger).
        coords: ``(end - start,)`` int64, original raster index ``row * cols + col`` of every token in
            the span; ``None`` means ``arange(rows * cols)`` (an untouched image). Entries of
            non-mergeable tokens are ignored and may be ``-1``.
        mergeable: ``(end - start,)`` bool; ``False`` marks structural tokens (e.g. LLaVA-NeXT
            row-newline tokens) that are kept and never merged. ``None`` means all mergeable.
    """

    start: int
    end: int
    rows: int
    cols: int
    coords: torch.Tensor | None = None
    mergeable: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Number of tokens in the span."""
        return self.end - self.start

    def coords_or_default(self) -> torch.Tensor:
        """``(length,)`` int64 original raster index of every token (CPU)."""
        if self.coords is None:
            return torch.arange(self.length, dtype=torch.long)
        return self.coords.to("cpu", torch.long)

    def mergeable_or_default(self) -> torch.Tensor:
        """``(length,)`` bool mergeable mask (CPU)."""
        if self.mergeable is None:
            return torch.ones(self.length, dtype=torch.bool)
        return self.mergeable.to("cpu", torch.bool)

    def num_mergeable(self) -> int:
        """Number of tokens of the span that may merge."""
        return self.length if self.mergeable is None else int(self.mergeable.sum())


def grid_with_row_newlines(rows: int, cols: int, start: int = 0) -> VisionSpan:
    """A ``rows x cols`` image laid out row by row, each row followed by a structural newline token (never
    merged), as LLaVA-NeXT lays out its unpadded high-resolution grid: ``rows * (cols + 1)`` tokens from
    ``start``."""
    raster = torch.arange(rows * cols).view(rows, cols)
    coords = torch.cat([raster, torch.full((rows, 1), -1)], dim=1).flatten()
    return VisionSpan(start, start + coords.numel(), rows, cols, coords, coords >= 0)


def as_span(span: VisionSpan | Sequence[int]) -> VisionSpan:
    """Normalise a span given as a ``VisionSpan``, ``(start, end)`` (square grid) or
    ``(start, end, rows, cols)``."""
    if isinstance(span, VisionSpan):
        return span
    values = tuple(span)
    if not all(isinstance(v, int) or (isinstance(v, torch.Tensor) and v.numel() == 1) for v in values):
        raise TypeError(f"a vision span must hold integers, got {span!r}")
    values = tuple(int(v) for v in values)
    if len(values) == 2:
        start, end = values
        side = _isqrt_exact(end - start)
        if side is None:
            raise ValueError(
                f"vision span {span!r} has {end - start} tokens, not a square number: give (start, end, rows, cols)"
            )
        return VisionSpan(start, end, side, side)
    if len(values) == 4:
        return VisionSpan(*values)
    raise ValueError(f"a vision span is (start, end) or (start, end, rows, cols), got {span!r}")


def _isqrt_exact(n: int) -> int | None:
    """``sqrt(n)`` if ``n`` is a perfect square, else ``None``."""
    if n < 0:
        return None
    side = math.isqrt(n)
    return side if side * side == n else None


def validate_spans(spans: Sequence[VisionSpan], seq_len: int, valid_start: int, valid_end: int, sample: int) -> None:
    """Check one sample's spans: sorted, non-overlapping, inside the sample's real tokens
    ``[valid_start, valid_end)`` of a sequence of ``seq_len``, and consistent with their grids.

    Raises:
        ValueError naming the sample, the span and the problem.
    """
    previous_end = valid_start
    for index, span in enumerate(spans):
        where = f"sample {sample}, vision span {index} [{span.start}, {span.end})"
        if span.rows < 1 or span.cols < 1:
            raise ValueError(f"{where}: grid {span.rows}x{span.cols} must be at least 1x1")
        if span.start < 0 or span.end > seq_len or span.start >= span.end:
            raise ValueError(f"{where}: out of range for a sequence of {seq_len} tokens")
        if span.start < valid_start or span.end > valid_end:
            raise ValueError(f"{where}: covers padding (real tokens are [{valid_start}, {valid_end}))")
        if span.start < previous_end:
            raise ValueError(f"{where}: spans must be sorted and must not overlap")
        previous_end = span.end
        for name, field in (("coords", span.coords), ("mergeable", span.mergeable)):
            if field is not None and tuple(field.shape) != (span.length,):
                raise ValueError(f"{where}: {name} has shape {tuple(field.shape)}, expected ({span.length},)")
        if span.coords is None:
            if span.length != span.rows * span.cols:
                raise ValueError(
                    f"{where}: {span.length} tokens but grid {span.rows}x{span.cols} has "
                    f"{span.rows * span.cols}; give coords for a span that is not a full grid"
                )
            continue
        coords = span.coords_or_default()[span.mergeable_or_default()]
        if coords.numel() and (int(coords.min()) < 0 or int(coords.max()) >= span.rows * span.cols):
            raise ValueError(
                f"{where}: coords must lie in [0, {span.rows * span.cols}) for grid {span.rows}x{span.cols}"
            )
        if torch.unique(coords).numel() != coords.numel():
            raise ValueError(f"{where}: coords of mergeable tokens repeat a grid cell")


def vision_token_mask(per_sample: Sequence[Sequence[VisionSpan]], seq: int, device: torch.device | str) -> torch.Tensor:
    """``(B, seq)`` bool: ``True`` on every token inside one of each sample's spans."""
    mask = torch.zeros(len(per_sample), seq, dtype=torch.bool, device=device)
    for b, spans in enumerate(per_sample):
        for span in spans:
            mask[b, span.start : span.end] = True
    return mask
