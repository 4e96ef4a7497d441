"""Windows and A/B sets of every image in a LightKV stage, planned on the host with small integer tensors.

An image's mergeable tokens are cut into ``W x W`` spatial windows (near-equal bands of its grid rows and
columns); inside a window, tokens alternate between the A set (even raster rank) and the B set (odd), and
each window loses ``num_merged(ratio, n)`` of its ``n`` tokens. See the README's "Semantics" section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lightkv_core.spans import VisionSpan

#: Slack on ``ratio * tokens`` so that decimal ratios such as ``0.29 * 100`` count as written.
RATIO_EPS = 1e-9


def num_merged(ratio: float, tokens: int) -> int:
    """Tokens a window of ``tokens`` mergeable tokens loses: ``min(floor(ratio * n), floor(n / 2))``
    (with ``1e-9`` slack so that decimal ratios such as ``0.29 * 100`` count as written)."""
    return min(math.floor(ratio * tokens + RATIO_EPS), tokens // 2)


def min_mergeable_tokens(window: int) -> int:
    """Mergeable tokens an image needs for a stage of ``window x window`` windows to merge it: ``8 W^2``."""
    return 8 * window * window


def band_of(index: torch.Tensor, length: int, bands: int) -> torch.Tensor:
    """Band of every row (or column) ``index`` when ``length`` rows are cut into ``bands`` near-equal
    bands, the first ``length % bands`` of them one row taller."""
    short, tall_bands = divmod(length, bands)
    tall_rows = tall_bands * (short + 1)
    in_short = index >= tall_rows
    tall_band = torch.div(index, short + 1, rounding_mode="floor")
    short_band = tall_bands + torch.div(index - tall_rows, max(short, 1), rounding_mode="floor")
    return torch.where(in_short, short_band, tall_band)


@dataclass
class WindowPlan:
    """The A/B sets of every window of a stage, as CSR lists over flat rows ``b * S + i`` of the batch.

    Attributes:
        a_rows: ``(NA,)`` int64 A tokens, grouped by window (windows in image order, raster order inside).
        a_offsets: ``(NW + 1,)`` int64 CSR pointers of the A tokens of each window.
        b_rows: ``(NB,)`` int64 B tokens, grouped the same way.
        b_offsets: ``(NW + 1,)`` int64 CSR pointers of the B tokens of each window.
        merges_per_window: ``(NW,)`` int64 tokens each window loses.
        samples_merging: per sample, whether any of its windows merges.
    """

    a_rows: torch.Tensor
    a_offsets: torch.Tensor
    b_rows: torch.Tensor
    b_offsets: torch.Tensor
    merges_per_window: torch.Tensor
    samples_merging: list[bool]

    @property
    def merges_anything(self) -> bool:
        return bool(self.merges_per_window.sum() > 0)


def image_windows(span: VisionSpan, window: int, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(tokens, window_id, order_key)`` of the span's mergeable tokens: sequence indices, window
    of each (0..W*W-1) and the raster key that orders a window."""
    mergeable = span.mergeable_or_default()
    tokens = span.start + mergeable.nonzero().squeeze(1)
    if layout == "reference":
        side = math.isqrt(max(tokens.numel() - 1, 0)) + 1
        key = torch.arange(tokens.numel())
        rows = cols = side
    else:
        key = span.coords_or_default()[mergeable]
        rows, cols = span.rows, span.cols
    row = torch.div(key, cols, rounding_mode="floor")
    window_id = band_of(row, rows, window) * window + band_of(key - row * cols, cols, window)
    return tokens, window_id, key


def plan_windows(per_sample: list[list[VisionSpan]], seq: int, window: int, ratio: float, layout: str) -> WindowPlan:
    """The :class:`WindowPlan` of a stage of ``window`` windows per side and ratio ``ratio`` over a batch of
    ``seq``-token samples with the given (checked) spans. An image with fewer than ``8 W^2`` mergeable tokens
    does not merge (in the ``"reference"`` layout, then no image of its sample merges)."""
    a_parts, b_parts, a_counts, b_counts, merges = [], [], [], [], []
    samples_merging = []
    min_tokens = min_mergeable_tokens(window)
    for b, sample_spans in enumerate(per_sample):
        counts = [span.num_mergeable() for span in sample_spans]
        skip_sample = layout == "reference" and any(c < min_tokens for c in counts)
        merging = False
        for span, count in zip(sample_spans, counts, strict=True):
            if skip_sample or count < min_tokens or ratio == 0.0:
                continue
            tokens, window_id, key = image_windows(span, window, layout)
            order = torch.argsort(window_id * (key.max() + 1) + key)
            tokens, window_id = tokens[order], window_id[order]
            per_window = torch.bincount(window_id, minlength=window * window)
            first = torch.cumsum(per_window, 0) - per_window
            rank = torch.arange(tokens.numel()) - first[window_id]
            is_a = rank % 2 == 0
            a_parts.append(b * seq + tokens[is_a])
            b_parts.append(b * seq + tokens[~is_a])
            a_counts.append(torch.bincount(window_id[is_a], minlength=window * window))
            b_counts.append(torch.bincount(window_id[~is_a], minlength=window * window))
            r = torch.tensor([num_merged(ratio, n) for n in per_window.tolist()], dtype=torch.long)
            merges.append(r)
            merging = merging or bool(r.sum() > 0)
        samples_merging.append(merging)

    empty = torch.zeros(0, dtype=torch.long)
    return WindowPlan(
        a_rows=torch.cat(a_parts) if a_parts else empty,
        a_offsets=_csr(a_counts),
        b_rows=torch.cat(b_parts) if b_parts else empty,
        b_offsets=_csr(b_counts),
        merges_per_window=torch.cat(merges) if merges else empty,
        samples_merging=samples_merging,
    )


def _csr(counts: list[torch.Tensor]) -> torch.Tensor:
    offsets = torch.zeros(sum(c.numel() for c in counts) + 1, dtype=torch.long)
    if counts:
        offsets[1:] = torch.cumsum(torch.cat(counts), 0)
    return offsets


def choose_merges(plan: WindowPlan, best: torch.Tensor, sim: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """``(B, S)`` int64 on ``best``'s device: for every input token, the index of the B token it merges into, or -1.
    Reads nothing back to the host (the plan's lists are host data, copied to the device).

    Args:
        plan: the stage's windows.
        best: ``(NA,)`` position in ``plan.b_rows`` of every A token's best match (``window_best_match``).
        sim: ``(NA,)`` its similarity; each window merges its ``merges_per_window`` most similar A tokens (ties:
            the earlier A token).
    """
    device = best.device
    merged_into = torch.full((batch * seq,), -1, dtype=torch.long, device=device)
    if plan.b_rows.numel() == 0:  # then no window merges (a window of n tokens has n // 2 B tokens)
        return merged_into.view(batch, seq)
    per_window = plan.a_offsets[1:] - plan.a_offsets[:-1]
    a_window = torch.repeat_interleave(torch.arange(per_window.numel()), per_window).to(device)
    a_first = plan.a_offsets.to(device)
    merges = plan.merges_per_window.to(device)
    order = torch.argsort(-sim, stable=True)
    order = order[torch.argsort(a_window[order], stable=True)]
    window_of = a_window[order]
    rank = torch.arange(order.numel(), device=device) - a_first[window_of]
    target = plan.b_rows.to(device)[best[order].clamp(min=0)] % seq
    merged_into[plan.a_rows.to(device)[order]] = torch.where(rank < merges[window_of], target, -1)
    return merged_into.view(batch, seq)
