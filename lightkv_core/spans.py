"""Vision spans: where each image's tokens sit in the current sequence, and their grid; the one place
spans, attention masks and position ids are checked."""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

#: The integer fields of a span, in the order of a ``(start, end, rows, cols)`` tuple.
SPAN_FIELDS = ("start", "end", "rows", "cols")
#: Integer dtypes accepted for coords and position ids (bool is not one).
INDEX_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def span_integer(where: str, field: str, value: object) -> int:
    """``value`` of a span's ``field`` as an ``int``: Python and NumPy integers and one-element integer tensors
    are integers; booleans and floats are not.

    Raises:
        TypeError naming ``where``, the field and the value.
    """
    boolean = isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)
    try:
        if not boolean:
            return operator.index(value)
    except TypeError:
        pass
    raise TypeError(f"{where}: {field} must be an integer, got {value!r}")


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

    def __post_init__(self) -> None:
        for name in SPAN_FIELDS:
            object.__setattr__(self, name, span_integer("VisionSpan", name, getattr(self, name)))

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


def as_span(span: VisionSpan | Sequence[int]) -> VisionSpan:
    """Normalise a span given as a ``VisionSpan``, ``(start, end)`` (square grid) or
    ``(start, end, rows, cols)`` of integers (NumPy integers too; booleans and floats are refused)."""
    if isinstance(span, VisionSpan):
        return span
    values = tuple(span)
    if len(values) not in (2, 4):
        raise ValueError(f"a vision span is (start, end) or (start, end, rows, cols), got {span!r}")
    where = f"vision span {span!r}"
    values = tuple(span_integer(where, field, v) for field, v in zip(SPAN_FIELDS, values, strict=False))
    if len(values) == 2:
        start, end = values
        side = _isqrt_exact(end - start)
        if side is None:
            raise ValueError(
                f"vision span {span!r} has {end - start} tokens, not a square number: give (start, end, rows, cols)"
            )
        return VisionSpan(start, end, side, side)
    return VisionSpan(*values)


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
        for name, field, dtypes, expected in (
            ("coords", span.coords, INDEX_DTYPES, "an integer"),
            ("mergeable", span.mergeable, (torch.bool,), "a bool"),
        ):
            if field is None:
                continue
            kind = field.dtype if isinstance(field, torch.Tensor) else type(field).__name__
            if kind not in dtypes:
                raise TypeError(f"{where}: {name} must be {expected} tensor, got {kind}")
            if tuple(field.shape) != (span.length,):
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


def _is_span(item: object) -> bool:
    """A span is a VisionSpan or a flat, non-empty tuple/list (its values are checked by ``as_span``); a list of
    spans holds tuples, lists or VisionSpans."""
    return isinstance(item, VisionSpan) or (
        isinstance(item, (tuple, list))
        and len(item) > 0
        and not any(isinstance(v, (VisionSpan, tuple, list)) for v in item)
    )


def normalise_spans(spans: Sequence, batch: int) -> tuple[bool, list[list[VisionSpan]]]:
    """``(single, per_sample)``: whether spans came in single-sample form (a list of spans, ``batch == 1``), and
    one list of :class:`VisionSpan` per sample. Does not check positions (see :func:`check_tokens`)."""
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


def check_sample_spans(spans: Sequence, seq_len: int) -> list[VisionSpan]:
    """One sample's vision spans as :class:`VisionSpan`, checked against a prompt of ``seq_len`` tokens.

    Args:
        spans: ``VisionSpan`` or ``(start, end[, rows, cols])`` tuples of one sample, sorted.
        seq_len: the sample's prompt length in tokens (no padding).

    Raises:
        TypeError if ``seq_len`` is not an integer or ``spans`` is not one sample's list of spans;
        ValueError naming the span and the problem (out of range, overlapping, grid mismatch, ...).
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral):
        raise TypeError(f"seq_len must be an integer, got {seq_len!r}")
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    if isinstance(spans, VisionSpan) or not isinstance(spans, (list, tuple)):
        raise TypeError(f"spans must be a list of one sample's vision spans, got {type(spans).__name__}")
    for index, span in enumerate(spans):
        if not isinstance(span, (VisionSpan, list, tuple)):
            raise TypeError(f"spans[{index}] is {type(span).__name__}: a single span goes in a list")
        if isinstance(span, (list, tuple)) and any(isinstance(v, (VisionSpan, list, tuple)) for v in span):
            raise TypeError(f"spans[{index}] is a list of spans: give one sample's spans, not a batch")
    sample = [as_span(span) for span in spans]
    validate_spans(sample, int(seq_len), 0, int(seq_len), 0)
    return sample


@dataclass
class TokenCheck:
    """A batch's spans, mask and position ids after the checks that need no device data (:func:`check_on_host`).

    Attributes:
        single: whether spans came in single-sample form.
        per_sample: one list of :class:`VisionSpan` per sample, each inside ``[0, S)``, sorted, matching its grid.
        real: ``(B, S)`` bool real tokens on the inputs' device (not yet known to be one run per sample).
        position_ids: ``(B, S)`` or ``(3, B, S)`` int64 given position ids on their own device, or ``None``.
    """

    single: bool
    per_sample: list[list[VisionSpan]]
    real: torch.Tensor
    position_ids: torch.Tensor | None


def check_on_host(
    spans: Sequence, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, hidden: torch.Tensor
) -> TokenCheck:
    """Every check of :func:`check_tokens` that reads no device data (shapes, dtypes, spans against the sequence
    and their grids); what the mask holds is checked later by :func:`check_real` on a host copy of it."""
    batch, seq = hidden.shape[:2]
    single, per_sample = normalise_spans(spans, batch)
    real = _check_mask(attention_mask, batch, seq, hidden.device)
    for b, sample_spans in enumerate(per_sample):
        validate_spans(sample_spans, seq, 0, seq, b)
    return TokenCheck(single, per_sample, real, _check_position_ids(position_ids, batch, seq))


def check_real(per_sample: Sequence[Sequence[VisionSpan]], real: torch.Tensor) -> None:
    """Each sample's real tokens ``real`` ``(B, S)`` bool (host) are one contiguous run and hold its spans.

    Raises:
        ValueError naming the sample (and the span) and the problem.
    """
    for b, run in enumerate(real_runs(real)):
        if run is None:
            raise ValueError(f"attention_mask of sample {b} is not one contiguous run of real tokens")
        start, end = run
        for index, span in enumerate(per_sample[b]):
            if span.start < start or span.end > end:
                raise ValueError(
                    f"sample {b}, vision span {index} [{span.start}, {span.end}): covers padding "
                    f"(real tokens are [{start}, {end}))"
                )


def default_position_ids(real: torch.Tensor) -> torch.Tensor:
    """``(B, S)`` int64 ordinal of every real token of ``real`` ``(B, S)`` bool (padding: 0)."""
    return (torch.cumsum(real.long(), dim=1) - 1).clamp(min=0)


def check_tokens(
    spans: Sequence, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None, hidden: torch.Tensor
) -> tuple[bool, list[list[VisionSpan]], torch.Tensor, torch.Tensor]:
    """A batch's spans, mask and position ids, each checked against ``hidden`` ``(B, S, D)``.

    Reads the mask on the host at once; the stage (:mod:`lightkv_core.stage`) uses :func:`check_on_host` and
    :func:`check_real` instead, so that the read joins its one host synchronisation.

    Args:
        spans: as :func:`normalise_spans` takes them.
        attention_mask: ``(B, S)`` bool/int real tokens, one contiguous run per sample; ``None``: all real.
        position_ids: ``(B, S)`` or ``(3, B, S)`` integer position ids; ``None``: each real token's ordinal.

    Returns:
        ``(single, per_sample spans, real (B, S) bool on hidden's device, position ids (CPU int64))``.
    """
    checked = check_on_host(spans, attention_mask, position_ids, hidden)
    real_host = checked.real.cpu()
    check_real(checked.per_sample, real_host)
    if checked.position_ids is None:
        return checked.single, checked.per_sample, checked.real, default_position_ids(real_host)
    positions = checked.position_ids.cpu()
    check_lowest_position(lowest_position(positions, real_host))
    return checked.single, checked.per_sample, checked.real, positions


def _check_mask(attention_mask: torch.Tensor | None, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, seq):
        raise ValueError(f"attention_mask must be a ({batch}, {seq}) tensor")
    return attention_mask.to(device=device, dtype=torch.bool)


def real_runs(real: torch.Tensor) -> list[tuple[int, int] | None]:
    """``[start, end)`` of each sample's real tokens ``real`` ``(B, S)`` bool (host), ``(0, 0)`` for a sample
    without any, ``None`` where they are not one contiguous run (the mask has holes)."""
    runs: list[tuple[int, int] | None] = []
    for row in real:
        index = row.nonzero().squeeze(1)
        if index.numel() == 0:
            runs.append((0, 0))
            continue
        start, end = int(index[0]), int(index[-1]) + 1
        runs.append((start, end) if index.numel() == end - start else None)
    return runs


def lowest_position(position_ids: torch.Tensor | None, real: torch.Tensor) -> torch.Tensor:
    """``(1,)`` int64 on ``real``'s device: the lowest position id of a real token (``real`` ``(B, S)`` bool), or 0
    if none is lower (no position ids, no real token). Position ids of padding are never read, so they may be
    anything. A stage reads it back with its one host synchronisation and checks it (:func:`check_lowest_position`).
    """
    zero = torch.zeros(1, dtype=torch.long, device=real.device)
    if position_ids is None:
        return zero
    given = torch.where(real, position_ids.to(real.device), 0).reshape(-1)
    return torch.cat([given, zero]).amin().reshape(1)


def check_lowest_position(lowest: int | torch.Tensor) -> None:
    """Raises ValueError if ``lowest`` (:func:`lowest_position`, host) is negative."""
    if int(lowest) < 0:
        raise ValueError(f"position_ids of real tokens must be >= 0, got {int(lowest)}")


def _check_position_ids(position_ids: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
    """``(B, S)`` or ``(3, B, S)`` int64 position ids on their own device (``None`` stays ``None``). That those of
    real tokens are not negative needs their values: see :func:`lowest_position`."""
    if position_ids is None:
        return None
    kind = position_ids.dtype if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
    if kind not in INDEX_DTYPES:
        raise TypeError(f"position_ids must be an integer tensor, got {kind}")
    if position_ids.dim() == 1 and batch == 1:
        position_ids = position_ids[None]
    if tuple(position_ids.shape) not in ((batch, seq), (3, batch, seq)):
        raise ValueError(
            f"position_ids must be ({batch}, {seq}) or (3, {batch}, {seq}), got {tuple(position_ids.shape)}"
        )
    return position_ids.long()
