"""Compaction: the shorter, padded batch a stage returns once it knows which tokens stay and which merge.

Shared by every in-prefill method: LightKV merges (``merged_into``) and compacts; the dropping methods (FastV,
random drop) only compact, through :func:`drop_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightkv_core.config import resolve_position_mode
from lightkv_core.kernels import merge_compact
from lightkv_core.kernels.launch import check_float
from lightkv_core.spans import (
    VisionSpan,
    check_lowest_position,
    check_on_host,
    check_real,
    default_position_ids,
    lowest_position,
)


@dataclass
class StageResult:
    """What one stage returns.

    Tensor fields are batch-first and padded to the longest sample (``S'`` = ``max(lengths)``).

    Attributes:
        hidden: ``(B, S', D)`` the shorter hidden states (padding rows are zeros), or the input itself where the
            stage removed no token (then ``S' = S``, padding rows as they came).
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


def check_padding_side(padding_side: str) -> None:
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")


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
        spans, positions, position_ids, attention_mask, padding_side: as for
            :func:`~lightkv_core.stage.lightkv_stage`.

    Returns:
        A :class:`StageResult` (``merged_into`` all ``-1``, ``scores`` ``None``); dropped vision tokens
        leave their span, whose ``coords`` and ``mergeable`` keep only the survivors'.
    """
    check_float("drop_tokens", "hidden", hidden)
    if hidden.dim() != 3 or hidden.shape[2] < 1:
        raise ValueError(f"hidden must be (B, S, D) with D >= 1, got shape {tuple(hidden.shape)}")
    batch, seq, _ = hidden.shape
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or tuple(keep.shape) != (batch, seq):
        raise ValueError(f"keep must be a ({batch}, {seq}) bool tensor")
    check_padding_side(padding_side)
    mode = resolve_position_mode(positions, "default")
    checked = check_on_host(spans, attention_mask, position_ids, hidden)
    merged_into = torch.full((batch, seq), -1, dtype=torch.long, device=hidden.device)
    lowest = lowest_position(checked.position_ids, checked.real)
    real, kept, merged_into, flags = read_choice(checked.real, merged_into, keep=keep.to(hidden.device), flags=lowest)
    check_real(checked.per_sample, real)
    check_lowest_position(flags[0])
    return compact(
        hidden,
        kept,
        merged_into,
        None,
        None,
        default_position_ids(real) if checked.position_ids is None else checked.position_ids,
        checked.per_sample,
        real=real,
        single=checked.single,
        mode=mode,
        padding_side=padding_side,
        backend="torch",
    )


#: Codes of :func:`read_choice`'s copy: a token that stays is -1, a merged one the index of its B token.
PADDING, DROPPED = -2, -3


def read_choice(
    real: torch.Tensor,
    merged_into: torch.Tensor,
    *,
    keep: torch.Tensor | None = None,
    flags: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A stage's one host synchronisation: one device-to-host copy of everything the host needs.

    Args:
        real: ``(B, S)`` bool real tokens; merged_into: ``(B, S)`` int64 B token each token merges into, or -1.
        keep: ``(B, S)`` bool tokens a dropping method keeps (``None``: every real token not merged).
        flags: ``(F,)`` bool or integer values to bring along (e.g. finiteness checks), or ``None``.

    Returns:
        Host tensors ``(real (B, S) bool, keep (B, S) bool, merged_into (B, S) int64 (-1 where not merged),
        flags (F,) int64)``.
    """
    batch, seq = real.shape
    codes = torch.where(real, merged_into, PADDING)
    if keep is not None:
        codes = torch.where(real & ~keep & (merged_into < 0), DROPPED, codes)
    payload = codes.reshape(-1)
    if flags is not None:
        payload = torch.cat([payload, flags.reshape(-1).long()])
    host = payload.cpu()
    codes = host[: batch * seq].view(batch, seq)
    return codes != PADDING, codes == -1, codes.clamp(min=-1), host[batch * seq :]


def compact(
    hidden: torch.Tensor,
    keep: torch.Tensor,
    merged_into: torch.Tensor,
    weights: torch.Tensor | None,
    scores: torch.Tensor | None,
    position_ids: torch.Tensor,
    per_sample: list[list[VisionSpan]],
    *,
    real: torch.Tensor,
    single: bool,
    mode: str,
    padding_side: str,
    backend: str,
) -> StageResult:
    """Merge every token with ``merged_into >= 0`` into its B token and write the ``keep`` tokens in order into
    a padded shorter batch, carrying positions and spans along. A choice that removes no real token returns the
    input as it is (:func:`unchanged`): a stage that merges nothing never changes the shape or the padding.

    Args:
        hidden: ``(B, S, D)``; keep: ``(B, S)`` bool (host); merged_into: ``(B, S)`` int64 (host).
        weights: ``(B, S)`` merge weights, or ``None`` for uniform; scores: returned as the result's ``scores``.
        position_ids: ``(B, S)`` or ``(3, B, S)`` int64 (any device); per_sample: the checked spans.
        real: ``(B, S)`` bool (host) the real tokens.
        single: whether spans came in single-sample form; mode: ``"original"`` or ``"compact"`` positions.
    """
    if torch.equal(keep, real):
        return unchanged(hidden, real, scores, position_ids, per_sample, single=single, mode=mode)
    batch, seq, dim = hidden.shape
    lengths = keep.sum(dim=1)
    out_len = int(lengths.max()) if batch else 0
    lists = merge_lists(keep, merged_into, padding_side)
    new_hidden = merge_compact(*_merge_inputs(hidden, weights, lists), backend=backend).view(batch, out_len, dim)
    out_rows = lists[0]
    kept_padded = torch.where(out_rows >= 0, out_rows % max(seq, 1), -1).view(batch, out_len)
    new_positions = _new_positions(position_ids, kept_padded.to(position_ids.device), mode)
    new_spans = [
        _new_spans(sample_spans, keep[b], int(out_len - lengths[b]) if padding_side == "left" else 0)
        for b, sample_spans in enumerate(per_sample)
    ]
    device = hidden.device
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


def unchanged(
    hidden: torch.Tensor,
    real: torch.Tensor,
    scores: torch.Tensor | None,
    position_ids: torch.Tensor,
    per_sample: list[list[VisionSpan]],
    *,
    single: bool,
    mode: str,
) -> StageResult:
    """The :class:`StageResult` of a stage that removed nothing: ``hidden`` itself (padding rows as they came, not
    zeroed), every real token of ``real`` ``(B, S)`` (host) in its place, the spans as they were."""
    batch, seq = real.shape
    device = hidden.device
    kept_padded = torch.where(real, torch.arange(seq).expand(batch, -1), -1)
    kept = [real[b].nonzero().squeeze(1).to(device) for b in range(batch)]
    spans = [list(sample) for sample in per_sample]
    return StageResult(
        hidden=hidden,
        positions=_new_positions(position_ids, kept_padded.to(position_ids.device), mode).to(device),
        lengths=real.sum(dim=1).to(device),
        kept_padded=kept_padded.to(device),
        kept=kept[0] if single else kept,
        spans=spans[0] if single else spans,
        merged_into=torch.full((batch, seq), -1, dtype=torch.long, device=device),
        scores=scores,
    )


def merge_arguments(
    hidden: torch.Tensor,
    keep: torch.Tensor,
    merged_into: torch.Tensor,
    weights: torch.Tensor | None,
    padding_side: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The arguments of :func:`~lightkv_core.kernels.merge_compact` for a stage's choice:
    ``(rows (B * S, D), weights (B * S,) float32, out_rows, src_offsets, src_rows)``, the index lists on ``keep``'s
    device (see :func:`merge_lists`; ``weights=None``: uniform)."""
    return _merge_inputs(hidden, weights, merge_lists(keep, merged_into, padding_side))


def _merge_inputs(
    hidden: torch.Tensor, weights: torch.Tensor | None, lists: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seq, dim = hidden.shape
    device = hidden.device
    if weights is None:
        weights = torch.ones(batch, seq, device=device)
    out_rows, src_offsets, sources = lists
    return hidden.reshape(batch * seq, dim), weights.reshape(-1).float().contiguous(), out_rows, src_offsets, sources


def merge_lists(
    keep: torch.Tensor, merged_into: torch.Tensor, padding_side: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The index lists of :func:`~lightkv_core.kernels.merge_compact` for a stage's choice (on ``keep``'s device).

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
    device = keep.device
    lengths = keep.sum(dim=1)
    out_len = int(lengths.max()) if batch else 0
    slot_of = torch.cumsum(keep, dim=1) - 1
    if padding_side == "left":
        slot_of = slot_of + (out_len - lengths)[:, None]
    sample_start = torch.arange(batch, device=device)[:, None]
    flat_slot = slot_of + sample_start * out_len
    out_rows = torch.full((batch * out_len,), -1, dtype=torch.long, device=device)
    out_rows[flat_slot[keep]] = torch.arange(batch * seq, device=device).view(batch, seq)[keep]

    merged_mask = merged_into >= 0
    sources = (sample_start * seq + torch.arange(seq, device=device)[None, :])[merged_mask]
    targets = (sample_start * seq + merged_into.clamp(min=0))[merged_mask]
    receiver = flat_slot.view(-1)[targets]
    order = torch.argsort(receiver * (batch * seq) + sources)
    sources, receiver = sources[order], receiver[order]
    src_offsets = torch.zeros(batch * out_len + 1, dtype=torch.long, device=device)
    src_offsets[1:] = torch.cumsum(torch.bincount(receiver, minlength=batch * out_len), 0)
    return out_rows, src_offsets, sources


def _new_positions(position_ids: torch.Tensor, kept_padded: torch.Tensor, mode: str) -> torch.Tensor:
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
