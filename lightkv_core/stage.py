"""One LightKV compression stage: score, window, match, merge, compact (README, "Semantics").

The stage runs on the output hidden states of a scheduled decoder layer, with that layer's post-RoPE ``q`` and
``k``. :func:`plan_stage` checks the inputs and plans the windows and A/B sets on the host from the spans (host
data), and the guide tokens on the device, giving the arguments of the three kernels of :mod:`lightkv_core.kernels`;
:func:`lightkv_stage` runs them, chooses the merges on the device, reads the choice back once
(:func:`~lightkv_core.compaction.read_choice`: the stage's one host synchronisation, where the checks that need the
mask, the position ids and the finiteness of the inputs are also decided) and compacts.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightkv_core.compaction import StageResult, check_padding_side, compact, read_choice
from lightkv_core.config import GUIDES, LAYOUTS, resolve_position_mode
from lightkv_core.kernels import cross_attention_scores, window_best_match
from lightkv_core.kernels.launch import check_float, softmax_scale
from lightkv_core.shards import HeadShards
from lightkv_core.spans import (
    VisionSpan,
    check_lowest_position,
    check_on_host,
    check_real,
    default_position_ids,
    lowest_position,
    vision_token_mask,
)
from lightkv_core.windows import WindowPlan, choose_merges, plan_windows


@dataclass
class StagePlan:
    """A stage's checked inputs and the arguments its kernels are launched with.

    The mask is not yet known to be one run of real tokens per sample holding the spans, nor the guide tokens to be
    there, nor the inputs to be finite, nor the position ids of real tokens to be ``>= 0``: :func:`lightkv_stage`
    decides those from its one read of the device (:func:`check_stage`).

    Attributes:
        single: whether ``spans`` came in single-sample form.
        per_sample: one list of checked spans per sample.
        real: ``(B, S)`` bool real tokens (on the inputs' device).
        position_ids: ``(B, S)`` or ``(3, B, S)`` int64 given position ids (their device), or ``None`` (ordinals).
        position_mode: ``"original"`` or ``"compact"``.
        guide: the guide tokens' choice (``"all_text"``, ``"prompt"`` or ``"none"``).
        guide_candidates: ``(B, S)`` bool (host), the tokens that guide where they are real (outside the images;
            with ``"prompt"``, after the last one), or ``None`` when no scores are computed.
        windows: the A/B sets of every window (host).
        score_arguments: ``(q, k, guide_index, guide_count, query_mask, scale)`` of
            :func:`~lightkv_core.kernels.cross_attention_scores` (on the device), or ``None`` (nothing merges, or
            ``guide="none"``).
        match_arguments: ``(rows (B * S, D), a_rows, a_offsets, b_rows, b_offsets)`` of
            :func:`~lightkv_core.kernels.window_best_match` (the index lists on the host), or ``None`` when nothing
            merges.
    """

    single: bool
    per_sample: list[list[VisionSpan]]
    real: torch.Tensor
    position_ids: torch.Tensor | None
    position_mode: str
    guide: str
    guide_candidates: torch.Tensor | None
    windows: WindowPlan
    score_arguments: tuple | None
    match_arguments: tuple | None


def plan_stage(
    hidden: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    spans: Sequence,
    window: int,
    ratio: float,
    *,
    guide: str = "all_text",
    layout: str = "default",
    positions: str | None = None,
    scale: float | None = None,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    padding_side: str = "right",
) -> StagePlan:
    """Check a stage's inputs and plan it (arguments as :func:`lightkv_stage`). Raises what it raises, except for
    the checks that need device data (see :class:`StagePlan`). Reads nothing back from the device."""
    batch, seq, _ = _check_tensors(hidden, q, k)
    window = _check_window(window)
    ratio = _check_ratio(ratio)
    scale = softmax_scale("lightkv_stage", scale, q.shape[-1])
    if guide not in GUIDES:
        raise ValueError(f"guide must be one of {GUIDES}, got {guide!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    check_padding_side(padding_side)
    if isinstance(positions, torch.Tensor):
        raise TypeError("positions is the positions mode ('original' or 'compact'): pass position ids as position_ids")
    mode = resolve_position_mode(positions, layout)
    checked = check_on_host(spans, attention_mask, position_ids, hidden)
    per_sample = checked.per_sample
    windows = plan_windows(per_sample, seq, window, ratio, layout)
    score_arguments = match_arguments = guide_candidates = None
    if windows.merges_anything:
        if guide != "none":
            guide_candidates = _guide_candidates(per_sample, seq, guide)
            guide_index, guide_count = _guide_tokens(guide_candidates, checked.real, windows.samples_merging)
            score_arguments = (q, k, guide_index, guide_count, checked.real, scale)
        match_arguments = (
            hidden.reshape(batch * seq, -1),
            windows.a_rows,
            windows.a_offsets,
            windows.b_rows,
            windows.b_offsets,
        )
    return StagePlan(
        checked.single,
        per_sample,
        checked.real,
        checked.position_ids,
        mode,
        guide,
        guide_candidates,
        windows,
        score_arguments,
        match_arguments,
    )


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
    positions: str | None = None,
    scale: float | None = None,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    padding_side: str = "right",
    backend: str = "auto",
    head_shards: HeadShards | None = None,
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
        layout: ``"default"`` (windows on the true grid) or ``"reference"`` (the released code's).
        positions: the positions mode, ``"original"`` or ``"compact"`` (``None``: by layout).
        scale: attention logit scale, a finite number ``> 0``; default ``1 / sqrt(d)``.
        position_ids: ``(B, S)`` or ``(3, B, S)`` integer input position ids, ``>= 0`` on real tokens; default:
            each real token's ordinal ``0, 1, ...``.
        attention_mask: ``(B, S)`` bool/int, real tokens (a contiguous run per sample, i.e. left or
            right padding); default all real. Padding is neither a query nor a guide and is dropped.
        padding_side: where the outputs are padded, ``"right"`` or ``"left"``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for all three kernels.
        head_shards: ``q`` and ``k`` hold this tensor-parallel rank's heads only: the scores are summed over the
            ranks (:class:`~lightkv_core.shards.HeadShards`) before they guide the merges.

    Returns:
        A :class:`~lightkv_core.compaction.StageResult`.

    Raises:
        TypeError / ValueError naming the problem: bad shapes or dtypes (no heads, a head size or hidden width of
        0), spans out of range, overlapping or unsorted or not of integers, grid size not matching a span,
        ``ratio`` outside ``[0, 1]``, ``window < 1``, ``scale`` not finite and positive, query heads not a multiple
        of key heads, a negative position id of a real token, NaN/Inf in the scores or hidden states.
    """
    plan = plan_stage(
        hidden,
        q,
        k,
        spans,
        window,
        ratio,
        guide=guide,
        layout=layout,
        positions=positions,
        scale=scale,
        position_ids=position_ids,
        attention_mask=attention_mask,
        padding_side=padding_side,
    )
    batch, seq, _ = hidden.shape
    merged_into = torch.full((batch, seq), -1, dtype=torch.long, device=hidden.device)
    scores = None
    if plan.match_arguments is not None:
        if plan.score_arguments is None:
            scores = torch.ones(batch, seq, dtype=torch.float32, device=q.device)
        else:
            scores = cross_attention_scores(*plan.score_arguments, backend=backend, check_indices=False)
            if head_shards is not None:
                scores = head_shards.sum(scores)
        best, sim = window_best_match(*plan.match_arguments, backend=backend)
        merged_into = choose_merges(plan.windows, best, sim, batch, seq)
    real, keep, merged_into, flags = read_choice(plan.real, merged_into, flags=_device_flags(plan, scores))
    check_stage(plan, real, flags)
    weights = scores if scores is not None and guide != "none" else None
    return compact(
        hidden,
        keep,
        merged_into,
        weights,
        scores,
        default_position_ids(real) if plan.position_ids is None else plan.position_ids,
        plan.per_sample,
        real=real,
        single=plan.single,
        mode=plan.position_mode,
        padding_side=padding_side,
        backend=backend,
    )


def _check_tensors(hidden: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int]:
    for name, tensor in (("hidden", hidden), ("q", q), ("k", k)):
        check_float("lightkv_stage", name, tensor)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, S, D), got shape {tuple(hidden.shape)}")
    batch, seq, dim = hidden.shape
    if dim < 1:
        raise ValueError(f"hidden must have a width D >= 1, got shape {tuple(hidden.shape)}")
    if q.dim() != 4 or q.shape[0] != batch or q.shape[2] != seq:
        raise ValueError(f"q must be (B, H, S, d) = ({batch}, H, {seq}, d), got {tuple(q.shape)}")
    if q.shape[1] < 1 or q.shape[3] < 1:
        raise ValueError(f"q needs at least one head of size d >= 1, got shape {tuple(q.shape)}")
    if k.dim() != 4 or k.shape[0] != batch or k.shape[2] != seq or k.shape[3] != q.shape[3]:
        raise ValueError(f"k must be (B, Hk, S, d) = ({batch}, Hk, {seq}, {q.shape[3]}), got {tuple(k.shape)}")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q has {q.shape[1]} heads, not a multiple of k's {k.shape[1]} heads")
    if not (hidden.device == q.device == k.device):
        raise ValueError(f"hidden, q and k must be on one device, got {hidden.device}, {q.device}, {k.device}")
    return batch, seq, dim


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


def _guide_candidates(per_sample: list[list[VisionSpan]], seq: int, guide: str) -> torch.Tensor:
    """``(B, S)`` bool (host): the tokens of each sample that guide where they are real: those outside its images,
    and with ``guide="prompt"`` only those after its last image."""
    candidates = ~vision_token_mask(per_sample, seq, "cpu")
    if guide == "prompt":
        for b, sample_spans in enumerate(per_sample):
            if sample_spans:
                candidates[b, : sample_spans[-1].end] = False
    return candidates


def _guide_tokens(
    candidates: torch.Tensor, real: torch.Tensor, samples_merging: list[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(guide_index (B, T), guide_count (B,))`` int64 on ``real``'s device: each sample's real guide
    ``candidates`` in order, none for samples that merge nothing. ``T`` is the most candidates a sample has, known
    on the host."""
    batch, seq = real.shape
    device = real.device
    width = max(1, int(candidates.sum(dim=1).max()))
    allowed = candidates & torch.tensor(samples_merging, dtype=torch.bool)[:, None]
    is_guide = real & allowed.to(device)
    column = torch.where(is_guide, torch.cumsum(is_guide, dim=1) - 1, width)
    guide_index = torch.zeros(batch, width + 1, dtype=torch.long, device=device)
    guide_index.scatter_(1, column, torch.arange(seq, device=device).expand(batch, seq))
    return guide_index[:, :width], is_guide.sum(dim=1)


def _device_flags(plan: StagePlan, scores: torch.Tensor | None) -> torch.Tensor:
    """``(F,)`` int64 on the device, what the checks after the read need: the lowest position id of a real token
    (:func:`~lightkv_core.spans.lowest_position`), then, when something merges (``scores`` given), whether the
    scores, and the hidden states, of the tokens that may merge are finite."""
    lowest = lowest_position(plan.position_ids, plan.real)
    if scores is None:
        return lowest
    rows, a_rows, _, b_rows, _ = plan.match_arguments
    involved = torch.cat([a_rows, b_rows]).to(rows.device)
    finite = torch.stack([torch.isfinite(scores.view(-1)[involved]).all(), torch.isfinite(rows[involved]).all()])
    return torch.cat([lowest, finite.long()])


def check_stage(plan: StagePlan, real: torch.Tensor, flags: torch.Tensor) -> None:
    """The checks of a stage that need device data, from the host copies of ``real`` ``(B, S)`` bool and of
    :func:`_device_flags`. Raises ValueError naming the problem."""
    check_real(plan.per_sample, real)
    check_lowest_position(flags[0])
    if plan.match_arguments is None:
        return
    if plan.guide_candidates is not None:
        has_guide = (real & plan.guide_candidates).any(dim=1)
        for b, merging in enumerate(plan.windows.samples_merging):
            if merging and not bool(has_guide[b]):
                raise ValueError(
                    f"sample {b} has no guide tokens for guide={plan.guide!r} (no text outside its images)"
                )
    if not bool(flags[1]):
        raise ValueError("non-finite cross-attention scores (NaN/Inf in q or k of the vision or guide tokens)")
    if not bool(flags[2]):
        raise ValueError("non-finite hidden states in vision tokens")
