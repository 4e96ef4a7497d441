"""KV length plans: how many tokens one request holds in each layer group, known before its forward.

A server's scheduler reserves KV memory per request before the prefill runs, so it needs the lengths that the
scheduled reduction stages will produce from the request's vision spans alone (no hidden states). For LightKV,
:func:`plan_lengths` predicts :func:`~lightkv_core.stage.lightkv_stage` stage by stage (how: its docstring; where
the plan is exact and how tight its bounds are: README, "SGLang", "Memory").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightkv_core.config import LightKVConfig
from lightkv_core.spans import VisionSpan, check_sample_spans
from lightkv_core.windows import RATIO_EPS, band_of, min_mergeable_tokens, num_merged


@dataclass(frozen=True)
class LengthPlan:
    """Tokens one sample holds in the KV cache of each layer group.

    Layer groups are split at the method's reduce layers ``l_1 < ... < l_K``: group 0 is layers
    ``0..l_1`` (they cache the full prompt), group ``k`` is layers ``l_k + 1 .. l_{k+1}`` and group ``K``
    runs from ``l_K + 1`` to the last layer (a reduce layer ``-1``, the input embeddings, leaves group 0
    empty).

    Attributes:
        lengths: ``K + 1`` token counts, ``lengths[0]`` the prompt length; upper bounds (what a KV pool
            must reserve) when not ``exact``.
        exact: whether ``lengths`` are exactly the lengths the forward produces.
        lower: ``K + 1`` lower bounds, equal to ``lengths`` when ``exact``.
    """

    lengths: tuple[int, ...]
    exact: bool
    lower: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.lower) != len(self.lengths):
            raise ValueError(f"lower has {len(self.lower)} groups, lengths {len(self.lengths)}")
        if any(low > high for low, high in zip(self.lower, self.lengths, strict=True)):
            raise ValueError(f"lower {self.lower} exceeds lengths {self.lengths}")
        if self.exact and self.lower != self.lengths:
            raise ValueError(f"an exact plan needs lower == lengths, got {self.lower} and {self.lengths}")

    @property
    def keeps_every_token(self) -> bool:
        """Whether every group holds exactly the whole prompt (nothing is merged or dropped: a text-only sample)."""
        return self.exact and all(length == self.lengths[0] for length in self.lengths)

    @classmethod
    def exactly(cls, lengths: Sequence[int]) -> LengthPlan:
        """An exact plan of the given per-group token counts."""
        lengths = tuple(int(n) for n in lengths)
        return cls(lengths=lengths, exact=True, lower=lengths)


def plan_lengths(spans: Sequence, schedule: LightKVConfig, seq_len: int) -> LengthPlan:
    """Tokens one sample holds in each layer group under the LightKV ``schedule``, before its forward.

    - ``layout="reference"``: windows depend only on each image's count of mergeable tokens (re-squared
      every stage), so every window's count, hence the plan, is exact.
    - ``layout="default"``: a token's window comes from its original grid coordinates, and a merged token
      takes the coordinates of the B token it merged into, which lies in the same window. The survivors of
      an image are tracked as *regions*: rectangles of the original grid with an exact survivor count
      (initially one per token). A stage whose windows each contain whole regions has exact window counts;
      a merging window becomes one region (the bounding box of its previous regions) holding its survivors.
      When a region straddles two of a stage's windows (band edges that do not nest, e.g. 6 then 4 windows
      on 36 rows), the split of its survivors is unknown and the image falls back to bounds on its
      survivor count for the remaining stages (see :func:`_bounded_stage`).

    Args:
        spans: the sample's vision spans (``VisionSpan`` or ``(start, end[, rows, cols])``), as given to
            :func:`~lightkv_core.stage.lightkv_stage` for its first stage.
        schedule: the LightKV schedule (windows, ratios and ``layout`` are used).
        seq_len: the sample's prompt length in tokens.

    Returns:
        A :class:`LengthPlan` with ``len(schedule.merge_layers) + 1`` groups: ``lengths[0] == seq_len``,
        ``lengths[k]`` is ``seq_len`` minus the vision tokens stages ``1..k`` remove. Exact in the
        reference layout; in the default layout exact unless an image's regions stop nesting in a
        later stage's windows (see above), and then ``lengths`` are upper bounds and
        ``lower`` lower bounds.

    Raises:
        TypeError / ValueError as :func:`~lightkv_core.spans.check_sample_spans`, or if ``schedule`` is not a
        :class:`~lightkv_core.config.LightKVConfig`.
    """
    if not isinstance(schedule, LightKVConfig):
        raise TypeError(f"schedule must be a LightKVConfig, got {type(schedule).__name__}")
    sample = check_sample_spans(spans, seq_len)
    seq_len = int(seq_len)
    stages = list(zip(schedule.merge_windows, schedule.merge_ratios, strict=True))
    if schedule.layout == "reference":
        removed = _reference_removed(sample, stages)
        return LengthPlan.exactly(seq_len - r for r in removed)
    images = [_GridImage.of(span) for span in sample]
    original = sum(image.high for image in images)
    highs, lows = [seq_len], [seq_len]
    for window, ratio in stages:
        for image in images:
            image.stage(window, ratio)
        highs.append(seq_len - original + sum(image.high for image in images))
        lows.append(seq_len - original + sum(image.low for image in images))
    exact = all(image.regions is not None for image in images)
    return LengthPlan(lengths=tuple(highs), exact=exact, lower=tuple(lows))


def _reference_removed(sample: list[VisionSpan], stages: list[tuple[int, float]]) -> list[int]:
    """Vision tokens of the sample removed before the stages and after each one, reference layout: a
    stage merges every image, or none if one image has fewer than ``8 W^2`` mergeable tokens."""
    counts = [span.num_mergeable() for span in sample]
    original = sum(counts)
    removed = [0]
    for window, ratio in stages:
        if ratio > 0.0 and all(count >= min_mergeable_tokens(window) for count in counts):
            counts = [count - _reference_merges(count, window, ratio) for count in counts]
        removed.append(original - sum(counts))
    return removed


def _reference_merges(tokens: int, window: int, ratio: float) -> int:
    """Tokens one image of ``tokens`` mergeable tokens loses in the reference layout: laid in raster
    order into a square of side ``ceil(sqrt(tokens))``, cut into ``window x window`` windows."""
    side = math.isqrt(max(tokens - 1, 0)) + 1
    key = torch.arange(tokens)
    row = torch.div(key, side, rounding_mode="floor")
    window_id = band_of(row, side, window) * window + band_of(key - row * side, side, window)
    per_window = torch.bincount(window_id, minlength=window * window)
    return sum(num_merged(ratio, n) for n in per_window.tolist())


@dataclass
class _Regions:
    """Exact survivors of one image: region ``i`` is the rectangle ``[top, bottom) x [left, right)`` of the
    original grid and holds exactly ``count[i] > 0`` surviving mergeable tokens. Each field ``(R,)`` int64."""

    top: torch.Tensor
    bottom: torch.Tensor
    left: torch.Tensor
    right: torch.Tensor
    count: torch.Tensor


@dataclass
class _GridImage:
    """One image's mergeable survivors through the stages (default layout): exact ``regions`` while they
    nest in every stage's windows, else ``None`` and only ``low <= survivors <= high`` is known."""

    rows: int
    cols: int
    regions: _Regions | None
    low: int
    high: int

    @classmethod
    def of(cls, span: VisionSpan) -> _GridImage:
        """Every mergeable token of ``span`` as a one-cell region at its original grid coordinates."""
        coords = span.coords_or_default()[span.mergeable_or_default()]
        row = torch.div(coords, span.cols, rounding_mode="floor")
        col = coords - row * span.cols
        regions = _Regions(row, row + 1, col, col + 1, torch.ones_like(coords))
        return cls(span.rows, span.cols, regions, coords.numel(), coords.numel())

    def stage(self, window: int, ratio: float) -> None:
        """Advance through one stage of ``window`` windows per side and ratio ``ratio``."""
        if self.regions is not None:
            self.regions = _exact_stage(self.regions, self.rows, self.cols, window, ratio)
            if self.regions is not None:
                self.low = self.high = int(self.regions.count.sum())
                return
        windows = min(self.rows, window) * min(self.cols, window)
        self.low, self.high = _bounded_stage(self.low, self.high, windows, ratio, min_mergeable_tokens(window))


def _exact_stage(regions: _Regions, rows: int, cols: int, window: int, ratio: float) -> _Regions | None:
    """The regions after one stage on a ``rows x cols`` grid, or ``None`` if the stage merges and a region
    straddles two of its windows (window counts unknown). Windows that merge nothing keep their regions;
    a merging window becomes one region, the bounding box of its previous ones."""
    tokens = int(regions.count.sum())
    if tokens < min_mergeable_tokens(window) or num_merged(ratio, tokens) == 0:
        return regions
    row_band = band_of(regions.top, rows, window)
    col_band = band_of(regions.left, cols, window)
    inside = (row_band == band_of(regions.bottom - 1, rows, window)) & (
        col_band == band_of(regions.right - 1, cols, window)
    )
    if not bool(inside.all()):
        return None
    window_id = row_band * window + col_band
    per_window = torch.zeros(window * window, dtype=torch.long).index_add_(0, window_id, regions.count)
    merged = torch.tensor([num_merged(ratio, n) for n in per_window.tolist()], dtype=torch.long)
    merging = merged > 0
    untouched = ~merging[window_id]

    def bounding(edge: torch.Tensor, reduce: str) -> torch.Tensor:
        per = torch.zeros(window * window, dtype=torch.long).scatter_reduce(
            0, window_id, edge, reduce, include_self=False
        )
        return torch.cat([edge[untouched], per[merging]])

    return _Regions(
        top=bounding(regions.top, "amin"),
        bottom=bounding(regions.bottom, "amax"),
        left=bounding(regions.left, "amin"),
        right=bounding(regions.right, "amax"),
        count=torch.cat([regions.count[untouched], (per_window - merged)[merging]]),
    )


def _bounded_stage(low: int, high: int, windows: int, ratio: float, threshold: int) -> tuple[int, int]:
    """Bounds on an image's mergeable survivors after a stage, from ``low <= n <= high`` before it.

    The image merges iff ``n >= threshold`` (``8 W^2``); it then loses ``sum_w f(n_w)`` over its at most
    ``windows`` non-empty windows, with ``f = num_merged(ratio, .)`` and unknown ``n_w`` summing to ``n``.
    Below ``rho = 1/2``, ``f(m) = floor(rho m + eps)``; from it on, ``f(m) = floor(m / 2)``. Then

    - ``sum_w f(n_w) <= min(floor(rho n + windows * eps), floor(n / 2))`` (floor is superadditive; each
      window adds its own ``eps`` slack), see :func:`most_removed`;
    - below ``1/2``: ``sum_w f(n_w) > sum_w (rho n_w + eps - 1) >= f(n) - windows``, an integer, so
      ``sum_w f(n_w) >= f(n) - (windows - 1)``; from ``1/2`` on: ``sum_w floor(n_w / 2) = (n - o) / 2``
      with ``o`` odd windows, at most ``min(windows, n)`` and of the parity of ``n``; see
      :func:`least_removed`.

    Both bounds on the removed count grow by 0 or 1 per token, so ``n - most`` and ``n - least`` are
    non-decreasing in ``n``: the fewest survivors come from the smallest ``n`` of each case (skip or
    merge), the most from the largest.
    """
    lows, highs = [], []
    if low < threshold:
        lows.append(low)
        highs.append(min(high, threshold - 1))
    if high >= threshold:
        smallest = max(low, threshold)
        lows.append(smallest - most_removed(ratio, smallest, windows))
        highs.append(high - least_removed(ratio, high, windows))
    return min(lows), max(highs)


def most_removed(ratio: float, tokens: int, windows: int) -> int:
    """Most tokens ``tokens`` mergeable tokens spread over ``windows`` windows can lose (``num_merged`` when
    ``windows == 1``)."""
    return min(math.floor(ratio * tokens + windows * RATIO_EPS), tokens // 2)


def least_removed(ratio: float, tokens: int, windows: int) -> int:
    """Fewest tokens ``tokens`` mergeable tokens spread over ``windows`` windows can lose."""
    if ratio >= 0.5:
        odd_windows = min(windows, tokens)
        odd_windows -= (odd_windows - tokens) % 2
        return (tokens - odd_windows) // 2
    return max(0, num_merged(ratio, tokens) - (windows - 1))
