"""One LightKV compression stage (``../shared/spec/lightkv.md``): score, window, match, merge, compact.

The stage runs on the output hidden states of a scheduled decoder layer, with that layer's post-RoPE
``q`` and ``k``. Index planning (windows, A/B sets, which A tokens merge) is done on the host with
small integer tensors; the three heavy steps are the kernels in :mod:`lightkv_core.kernels`.

Batches: samples may have different spans, padding and survivor counts. Outputs are padded to the
longest survivor count (``padding_side``), with ``lengths`` giving each sample's real length.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightkv_core.config import GUIDES, LAYOUTS, resolve_position_mode
from lightkv_core.kernels import cross_attention_scores, merge_compact, window_best_match
from lightkv_core.kernels._backend import check_float
from lightkv_core.spans import VisionSpan, as_span, validate_spans

RATIO_EPS = 1e-9


@dataclass
class StageResult:
    """What one stage returns.

    Tensor fields are batch-first and padded to the longest sample (``S'`` = ``max(lengths)``).

    Attributes:
        hidden: ``(B, S', D)`` the shorter hidden states (padding rows are zeros).
        positions: ``(B, S')`` or ``(3, B, S')`` (M-RoPE) int64 position ids of the survivors
            (padding: 0).
        lengths: ``(B,)`` int64 real length of each sample.
        kept_padded: ``(B, S')`` int64 input index of every output token, ``-1`` on padding.
        kept: input indices that survive, ascending (a merged token is listed at its B token's
            index): a 1-D tensor when ``spans`` was given for a single sample, else a list with one
            1-D tensor per sample.
        spans: the new spans in the output sequence, in the same form as the ``spans`` argument.
        merged_into: ``(B, S)`` int64, for every input token the input index of the B token it was
            merged into, or ``-1`` if it survives (or is padding).
        scores: ``(B, S)`` float32 cross-attention score of every token (0 where not needed), or
            ``None`` when nothing merged.
    """

    hidden: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor
    kept_padded: torch.Tensor
    kept: torch.Tensor | list[torch.Tensor]
    spans: list[VisionSpan] | list[list[VisionSpan]]
    merged_into: torch.Tensor
    scores: torch.Tensor | None


def num_merged(ratio: float, tokens: int) -> int:
    """Tokens a window of ``tokens`` mergeable tokens loses: ``min(floor(ratio * n), floor(n / 2))``
    (with ``1e-9`` slack so that decimal ratios such as ``0.29 * 100`` count as written)."""
    return min(math.floor(ratio * tokens + RATIO_EPS), tokens // 2)


def band_of(index: torch.Tensor, length: int, bands: int) -> torch.Tensor:
    """Band of every row (or column) ``index`` when ``length`` rows are cut into ``bands`` near-equal
    bands, the first ``length % bands`` of them one row taller."""
    short, tall_bands = divmod(length, bands)
    tall_rows = tall_bands * (short + 1)
    in_short = index >= tall_rows
    tall_band = torch.div(index, short + 1, rounding_mode="floor")
    short_band = tall_bands + torch.div(index - tall_rows, max(short, 1), rounding_mode="floor")
    return torch.where(in_short, short_band, tall_band)


def lightkv_stage(
    hidden: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    spans: Sequence,
    window: int,
    ratio: float,
    *,
    guide: str = "all_text",
    layout: str = "default",
    positions: str | torch.Tensor | None = None,
    scale: float | None = None,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    padding_side: str = "right",
    backend: str = "auto",
) -> StageResult:
    """Run one LightKV stage on the output of a decoder layer.

    Args:
        hidden: ``(B, S, D)`` output hidden states of the layer (fp16/bf16/fp32).
        q: ``(B, H, S, d)`` the layer's post-RoPE queries.
        k: ``(B, Hk, S, d)`` the layer's post-RoPE keys, ``H % Hk == 0``.
        spans: for a single sample (``B == 1``) a list of vision spans; for a batch a list of ``B``
            such lists. A span is a :class:`VisionSpan`, ``(start, end, rows, cols)`` or
            ``(start, end)`` for a square grid; ``end`` is exclusive.
        window: windows per image side ``W >= 1``.
        ratio: fraction ``rho`` in ``[0, 1]`` of each window's tokens removed (capped at half).
        guide: ``"all_text"``, ``"prompt"`` or ``"none"`` (uniform merge weights).
        layout: ``"default"`` (windows on the true grid) or ``"reference"`` (released code).
        positions: the positions mode, ``"original"`` or ``"compact"`` (``None``: by layout); a tensor
            here is taken as ``position_ids`` in ``"original"`` mode.
        scale: attention logit scale, default ``1 / sqrt(d)``.
        position_ids: ``(B, S)`` or ``(3, B, S)`` input position ids; default: each real token's
            ordinal ``0, 1, ...``.
        attention_mask: ``(B, S)`` bool/int, real tokens (a contiguous run per sample, i.e. left or
            right padding); default all real. Padding is neither a query nor a guide and is dropped.
        padding_side: where the outputs are padded, ``"right"`` or ``"left"``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for all three kernels.

    Returns:
        A :class:`StageResult`.

    Raises:
        TypeError / ValueError naming the problem: bad shapes or dtypes, spans out of range,
        overlapping or unsorted, grid size not matching a span, ``ratio`` outside ``[0, 1]``,
        ``window < 1``, query heads not a multiple of key heads, NaN/Inf in the scores or hidden states.
    """
    batch, seq, dim = _check_tensors(hidden, q, k)
    window = _check_window(window)
    ratio = _check_ratio(ratio)
    if guide not in GUIDES:
        raise ValueError(f"guide must be one of {GUIDES}, got {guide!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if isinstance(positions, torch.Tensor):
        if position_ids is not None:
            raise ValueError("give position ids either as positions=<tensor> or as position_ids, not both")
        positions, position_ids = "original", positions
    mode = resolve_position_mode(positions, layout)
    single, per_sample, real, position_ids = _check_tokens(spans, attention_mask, position_ids, hidden)

    plan = _plan_windows(per_sample, seq, window, ratio, layout)
    merged_into = torch.full((batch, seq), -1, dtype=torch.long)
    scores = None
    if plan.merges_anything:
        scores = _scores(q, k, per_sample, real, plan.samples_merging, guide, scale, backend, seq)
        merged_into = _choose_merges(hidden, plan, scores, backend, batch, seq)

    keep = real.cpu() & (merged_into < 0)
    weights = scores if scores is not None and guide != "none" else None
    return _compact(
        hidden,
        keep,
        merged_into,
        weights,
        scores,
        position_ids,
        per_sample,
        single=single,
        mode=mode,
        padding_side=padding_side,
        backend=backend,
    )


# ----------------------------------------------------------------------------------------------
# Input checks


def _check_tensors(hidden: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int]:
    for name, tensor in (("hidden", hidden), ("q", q), ("k", k)):
        check_float("lightkv_stage", name, tensor)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, S, D), got shape {tuple(hidden.shape)}")
    batch, seq, dim = hidden.shape
    if q.dim() != 4 or q.shape[0] != batch or q.shape[2] != seq:
        raise ValueError(f"q must be (B, H, S, d) = ({batch}, H, {seq}, d), got {tuple(q.shape)}")
    if k.dim() != 4 or k.shape[0] != batch or k.shape[2] != seq or k.shape[3] != q.shape[3]:
        raise ValueError(f"k must be (B, Hk, S, d) = ({batch}, Hk, {seq}, {q.shape[3]}), got {tuple(k.shape)}")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q has {q.shape[1]} heads, not a multiple of k's {k.shape[1]} heads")
    if not (hidden.device == q.device == k.device):
        raise ValueError(f"hidden, q and k must be on one device, got {hidden.device}, {q.device}, {k.device}")
    return batch, seq, dim


def _check_tokens(
    spans: Sequence, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, hidden: torch.Tensor
) -> tuple[bool, list[list[VisionSpan]], torch.Tensor, torch.Tensor]:
    """``(single, per_sample spans, real (B, S) bool, position ids)``, each checked against ``hidden``."""
    batch, seq = hidden.shape[:2]
    single, per_sample = normalise_spans(spans, batch)
    real = _check_mask(attention_mask, batch, seq, hidden.device)
    bounds = _real_bounds(real)
    for b, sample_spans in enumerate(per_sample):
        validate_spans(sample_spans, seq, bounds[b][0], bounds[b][1], b)
    return single, per_sample, real, _check_position_ids(position_ids, real, batch, seq)


def _check_window(window: object) -> int:
    if isinstance(window, bool) or not isinstance(window, numbers.Integral):
        raise TypeError(f"window must be an integer, got {window!r}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return int(window)


def _check_ratio(ratio: object) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(f"ratio must be a number in [0, 1], got {ratio!r}")
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"ratio must lie in [0, 1], got {ratio}")
    return float(ratio)


def _is_span(item: object) -> bool:
    """A span is a VisionSpan or a flat tuple/list of numbers (validated by ``as_span``)."""
    return isinstance(item, VisionSpan) or (
        isinstance(item, (tuple, list)) and len(item) > 0 and all(isinstance(v, numbers.Number) for v in item)
    )


def normalise_spans(spans: Sequence, batch: int) -> tuple[bool, list[list[VisionSpan]]]:
    """``(single, per_sample)``: whether spans came in single-sample form, and one span list per sample."""
    if not isinstance(spans, (list, tuple)):
        raise TypeError(f"spans must be a list of spans (or a list of per-sample lists), got {type(spans).__name__}")
    if len(spans) == 0 or _is_span(spans[0]):
        if batch != 1:
            raise ValueError(f"a batch of {batch} samples needs one list of spans per sample")
        return True, [[as_span(s) for s in spans]]
    if len(spans) != batch:
        raise ValueError(f"spans has {len(spans)} per-sample lists for a batch of {batch}")
    per_sample = []
    for b, sample_spans in enumerate(spans):
        if not isinstance(sample_spans, (list, tuple)):
            raise TypeError(f"spans of sample {b} must be a list of spans, got {type(sample_spans).__name__}")
        per_sample.append([as_span(s) for s in sample_spans])
    return False, per_sample


def _check_mask(attention_mask: torch.Tensor | None, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, seq):
        raise ValueError(f"attention_mask must be a ({batch}, {seq}) tensor")
    return attention_mask.to(device=device, dtype=torch.bool)


def _real_bounds(real: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, end)`` of each sample's real tokens; they must be one contiguous run."""
    bounds = []
    for b, row in enumerate(real.cpu()):
        index = row.nonzero().squeeze(1)
        if index.numel() == 0:
            bounds.append((0, 0))
            continue
        start, end = int(index[0]), int(index[-1]) + 1
        if index.numel() != end - start:
            raise ValueError(f"attention_mask of sample {b} is not one contiguous run of real tokens")
        bounds.append((start, end))
    return bounds


def _check_position_ids(position_ids: torch.Tensor | None, real: torch.Tensor, batch: int, seq: int) -> torch.Tensor:
    """``(B, S)`` or ``(3, B, S)`` int64 position ids on the CPU."""
    if position_ids is None:
        return (torch.cumsum(real.cpu().long(), dim=1) - 1).clamp(min=0)
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point:
        raise TypeError("position_ids must be an integer tensor")
    if position_ids.dim() == 1 and batch == 1:
        position_ids = position_ids[None]
    if tuple(position_ids.shape) not in ((batch, seq), (3, batch, seq)):
        raise ValueError(
            f"position_ids must be ({batch}, {seq}) or (3, {batch}, {seq}), got {tuple(position_ids.shape)}"
        )
    return position_ids.cpu().long()


# ----------------------------------------------------------------------------------------------
# Planning: windows and A/B sets of every image, on the host


@dataclass
class _Plan:
    a_rows: torch.Tensor  # (NA,) flat rows b * S + i, grouped by window, window order inside
    a_offsets: torch.Tensor  # (NW + 1,)
    b_rows: torch.Tensor  # (NB,)
    b_offsets: torch.Tensor  # (NW + 1,)
    merges_per_window: torch.Tensor  # (NW,) r of every window
    samples_merging: list[bool]

    @property
    def merges_anything(self) -> bool:
        return bool(self.merges_per_window.sum() > 0)


def _image_windows(span: VisionSpan, window: int, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def _plan_windows(per_sample: list[list[VisionSpan]], seq: int, window: int, ratio: float, layout: str) -> _Plan:
    a_parts, b_parts, a_counts, b_counts, merges = [], [], [], [], []
    samples_merging = []
    min_tokens = 8 * window * window
    for b, sample_spans in enumerate(per_sample):
        counts = [span.num_mergeable() for span in sample_spans]
        skip_sample = layout == "reference" and any(c < min_tokens for c in counts)
        merging = False
        for span, count in zip(sample_spans, counts, strict=True):
            if skip_sample or count < min_tokens or ratio == 0.0:
                continue
            tokens, window_id, key = _image_windows(span, window, layout)
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

    def csr(counts: list[torch.Tensor]) -> torch.Tensor:
        offsets = torch.zeros(sum(c.numel() for c in counts) + 1, dtype=torch.long)
        if counts:
            offsets[1:] = torch.cumsum(torch.cat(counts), 0)
        return offsets

    empty = torch.zeros(0, dtype=torch.long)
    return _Plan(
        a_rows=torch.cat(a_parts) if a_parts else empty,
        a_offsets=csr(a_counts),
        b_rows=torch.cat(b_parts) if b_parts else empty,
        b_offsets=csr(b_counts),
        merges_per_window=torch.cat(merges) if merges else empty,
        samples_merging=samples_merging,
    )


# ----------------------------------------------------------------------------------------------
# Scoring and choosing the merges


def _scores(
    q: torch.Tensor,
    k: torch.Tensor,
    per_sample: list[list[VisionSpan]],
    real: torch.Tensor,
    samples_merging: list[bool],
    guide: str,
    scale: float | None,
    backend: str,
    seq: int,
) -> torch.Tensor:
    """``(B, S)`` float32 scores; samples that merge nothing get zeros (their guide count is 0)."""
    batch = len(per_sample)
    if guide == "none":
        return torch.ones(batch, seq, dtype=torch.float32, device=q.device)
    guides = []
    real_cpu = real.cpu()
    for b, sample_spans in enumerate(per_sample):
        is_guide = real_cpu[b].clone()
        for span in sample_spans:
            is_guide[span.start : span.end] = False
        if guide == "prompt" and sample_spans:
            is_guide[: sample_spans[-1].end] = False
        index = is_guide.nonzero().squeeze(1)
        if samples_merging[b] and index.numel() == 0:
            raise ValueError(f"sample {b} has no guide tokens for guide={guide!r} (no text outside its images)")
        guides.append(index if samples_merging[b] else index[:0])
    width = max(1, max(g.numel() for g in guides))
    guide_index = torch.zeros(batch, width, dtype=torch.long)
    for b, index in enumerate(guides):
        guide_index[b, : index.numel()] = index
    guide_count = torch.tensor([g.numel() for g in guides], dtype=torch.long)
    return cross_attention_scores(
        q, k, guide_index.to(q.device), guide_count.to(q.device), real, scale, backend=backend
    )


def _choose_merges(
    hidden: torch.Tensor, plan: _Plan, scores: torch.Tensor, backend: str, batch: int, seq: int
) -> torch.Tensor:
    """``(B, S)`` int64: for every input token, the index of the B token it merges into, or -1."""
    device = hidden.device
    rows = hidden.reshape(batch * seq, -1)
    a_rows, b_rows = plan.a_rows.to(device), plan.b_rows.to(device)
    involved = torch.cat([a_rows, b_rows])
    if not bool(torch.isfinite(scores.view(-1)[involved]).all()):
        raise ValueError("non-finite cross-attention scores (NaN/Inf in q or k of the vision or guide tokens)")
    if not bool(torch.isfinite(rows[involved]).all()):
        raise ValueError("non-finite hidden states in vision tokens")
    best, sim = window_best_match(
        rows, a_rows, plan.a_offsets.to(device), b_rows, plan.b_offsets.to(device), backend=backend
    )
    best, sim = best.cpu(), sim.cpu()
    a_window = torch.repeat_interleave(
        torch.arange(plan.merges_per_window.numel()), plan.a_offsets[1:] - plan.a_offsets[:-1]
    )
    order = torch.argsort(-sim, stable=True)
    order = order[torch.argsort(a_window[order], stable=True)]
    rank = torch.arange(order.numel()) - plan.a_offsets[a_window[order]]
    chosen = order[rank < plan.merges_per_window[a_window[order]]]
    merged_into = torch.full((batch * seq,), -1, dtype=torch.long)
    merged_into[plan.a_rows[chosen]] = plan.b_rows[best[chosen]] % seq
    return merged_into.view(batch, seq)


# ----------------------------------------------------------------------------------------------
# Outputs


def drop_tokens(
    hidden: torch.Tensor,
    keep: torch.Tensor,
    spans: Sequence,
    *,
    positions: str = "original",
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    padding_side: str = "right",
) -> StageResult:
    """Keep the tokens marked in ``keep`` and drop the rest (no merging): the compaction step shared by
    the token-dropping methods (FastV, random drop).

    Args:
        hidden: ``(B, S, D)`` hidden states.
        keep: ``(B, S)`` bool, tokens that survive; padding (``attention_mask`` False) is dropped anyway.
        spans, positions, position_ids, attention_mask, padding_side: as for :func:`lightkv_stage`.

    Returns:
        A :class:`StageResult` (``merged_into`` all ``-1``, ``scores`` ``None``); dropped vision tokens
        leave their span, whose ``coords`` and ``mergeable`` keep only the survivors'.
    """
    check_float("drop_tokens", "hidden", hidden)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, S, D), got shape {tuple(hidden.shape)}")
    batch, seq, _ = hidden.shape
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (batch, seq):
        raise ValueError(f"keep must be a ({batch}, {seq}) bool tensor")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    mode = resolve_position_mode(positions, "default")
    single, per_sample, real, position_ids = _check_tokens(spans, attention_mask, position_ids, hidden)
    merged_into = torch.full((batch, seq), -1, dtype=torch.long)
    keep = real.cpu() & keep.cpu()
    return _compact(
        hidden,
        keep,
        merged_into,
        None,
        None,
        position_ids,
        per_sample,
        single=single,
        mode=mode,
        padding_side=padding_side,
        backend="torch",
    )


def _compact(
    hidden: torch.Tensor,
    keep: torch.Tensor,
    merged_into: torch.Tensor,
    weights: torch.Tensor | None,
    scores: torch.Tensor | None,
    position_ids: torch.Tensor,
    per_sample: list[list[VisionSpan]],
    *,
    single: bool,
    mode: str,
    padding_side: str,
    backend: str,
) -> StageResult:
    """Merge every token with ``merged_into >= 0`` into its B token (weights: ``(B, S)`` or ``None``
    for uniform), write the ``keep`` tokens in order into a padded shorter batch, and carry positions
    and spans along."""
    batch, seq, dim = hidden.shape
    lengths = keep.sum(dim=1)
    out_len = int(lengths.max()) if batch else 0
    out_rows, src_offsets, sources = merge_lists(keep, merged_into, padding_side)

    device = hidden.device
    if weights is None:
        weights = torch.ones(batch, seq, device=device)
    new_hidden = merge_compact(
        hidden.reshape(batch * seq, dim),
        weights.reshape(-1).float().contiguous(),
        out_rows.to(device),
        src_offsets.to(device),
        sources.to(device),
        backend=backend,
    ).view(batch, out_len, dim)

    kept_padded = torch.where(out_rows >= 0, out_rows % max(seq, 1), -1).view(batch, out_len)
    new_positions = _new_positions(position_ids, kept_padded, lengths, mode, padding_side)
    new_spans = [
        _new_spans(sample_spans, keep[b], int(out_len - lengths[b]) if padding_side == "left" else 0)
        for b, sample_spans in enumerate(per_sample)
    ]
    kept = [keep[b].nonzero().squeeze(1).to(device) for b in range(batch)]
    return StageResult(
        hidden=new_hidden,
        positions=new_positions.to(device),
        lengths=lengths.to(device),
        kept_padded=kept_padded.to(device),
        kept=kept[0] if single else kept,
        spans=new_spans[0] if single else new_spans,
        merged_into=merged_into.to(device),
        scores=scores,
    )


def merge_lists(
    keep: torch.Tensor, merged_into: torch.Tensor, padding_side: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The arguments of :func:`~lightkv_core.kernels.merge_compact` for a stage's choice (CPU tensors).

    Args:
        keep: ``(B, S)`` bool, the tokens that stay (each sample's survivors go to a row of ``max(keep.sum(1))``
            slots, padded on ``padding_side``).
        merged_into: ``(B, S)`` int64, the B token every merged token joins, ``-1`` for the others.
        padding_side: ``"left"`` or ``"right"``.

    Returns:
        ``out_rows`` ``(B * L,)`` flat input row of every output slot (``-1``: padding), and the CSR
        ``src_offsets`` ``(B * L + 1,)`` / ``src_rows`` of the flat rows merged into each slot.
    """
    batch, seq = keep.shape
    lengths = keep.sum(dim=1)
    out_len = int(lengths.max()) if batch else 0
    slot_of = torch.cumsum(keep, dim=1) - 1
    if padding_side == "left":
        slot_of = slot_of + (out_len - lengths)[:, None]
    flat_slot = slot_of + torch.arange(batch)[:, None] * out_len
    out_rows = torch.full((batch * out_len,), -1, dtype=torch.long)
    out_rows[flat_slot[keep]] = torch.arange(batch * seq).view(batch, seq)[keep]

    merged_mask = merged_into >= 0
    sources = (torch.arange(batch)[:, None] * seq + torch.arange(seq)[None, :])[merged_mask]
    targets = (torch.arange(batch)[:, None] * seq + merged_into.clamp(min=0))[merged_mask]
    receiver = flat_slot.view(-1)[targets]
    order = torch.argsort(receiver * (batch * seq) + sources)
    sources, receiver = sources[order], receiver[order]
    src_offsets = torch.zeros(batch * out_len + 1, dtype=torch.long)
    src_offsets[1:] = torch.cumsum(torch.bincount(receiver, minlength=batch * out_len), 0)
    return out_rows, src_offsets, sources


def _new_positions(
    position_ids: torch.Tensor, kept_padded: torch.Tensor, lengths: torch.Tensor, mode: str, padding_side: str
) -> torch.Tensor:
    padding = kept_padded < 0
    if mode == "compact":
        ordinal = torch.cumsum(~padding, dim=1) - 1
        compact = torch.where(padding, 0, ordinal)
        return compact.expand(3, *compact.shape).clone() if position_ids.dim() == 3 else compact
    index = kept_padded.clamp(min=0)
    if position_ids.dim() == 3:
        gathered = torch.gather(position_ids, 2, index.expand(3, *index.shape))
        return torch.where(padding, 0, gathered)
    return torch.where(padding, 0, torch.gather(position_ids, 1, index))


def _new_spans(spans: list[VisionSpan], keep: torch.Tensor, offset: int) -> list[VisionSpan]:
    """Spans of the survivors in the output sequence (``offset``: left padding of the sample)."""
    before = torch.cumsum(keep, 0) - keep.long()
    result = []
    for span in spans:
        survive = keep[span.start : span.end]
        start = int(before[span.start]) + offset
        result.append(
            VisionSpan(
                start=start,
                end=start + int(survive.sum()),
                rows=span.rows,
                cols=span.cols,
                coords=span.coords_or_default()[survive],
                mergeable=span.mergeable_or_default()[survive],
            )
        )
    return result
