"""One LightKV compression stage: score, window, match, merge, compact (README, "Semantics").

The stage runs on the output hidden states of a scheduled decoder layer, with that layer's post-RoPE ``q`` and
``k``. :func:`plan_stage` checks the inputs and plans on the host (windows, A/B sets, guide tokens), giving the
arguments of the three kernels of :mod:`lightkv_core.kernels`; :func:`lightkv_stage` runs them and compacts.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightkv_core.compaction import StageResult, check_padding_side, compact
from lightkv_core.config import GUIDES, LAYOUTS, resolve_position_mode
from lightkv_core.kernels import cross_attention_scores, window_best_match
from lightkv_core.kernels.launch import check_float
from lightkv_core.spans import VisionSpan, check_tokens
from lightkv_core.windows import WindowPlan, choose_merges, plan_windows


@dataclass
class StagePlan:
    """A stage's checked inputs and the arguments its kernels are launched with.

    Attributes:
        single: whether ``spans`` came in single-sample form.
        per_sample: one list of checked spans per sample.
        real: ``(B, S)`` bool real tokens (on the inputs' device).
        position_ids: ``(B, S)`` or ``(3, B, S)`` int64 input position ids (CPU).
        position_mode: ``"original"`` or ``"compact"``.
        windows: the A/B sets of every window.
        score_arguments: ``(q, k, guide_index, guide_count, query_mask, scale)`` of
            :func:`~lightkv_core.kernels.cross_attention_scores`, or ``None`` (nothing merges, or ``guide="none"``).
        match_arguments: ``(rows (B * S, D), a_rows, a_offsets, b_rows, b_offsets)`` of
            :func:`~lightkv_core.kernels.window_best_match`, or ``None`` when nothing merges.
    """

    single: bool
    per_sample: list[list[VisionSpan]]
    real: torch.Tensor
    position_ids: torch.Tensor
    position_mode: str
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
    """Check a stage's inputs and plan it (arguments as :func:`lightkv_stage`). Raises what it raises."""
    batch, seq, _ = _check_tensors(hidden, q, k)
    window = _check_window(window)
    ratio = _check_ratio(ratio)
    if guide not in GUIDES:
        raise ValueError(f"guide must be one of {GUIDES}, got {guide!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    check_padding_side(padding_side)
    if isinstance(positions, torch.Tensor):
        raise TypeError("positions is the positions mode ('original' or 'compact'): pass position ids as position_ids")
    mode = resolve_position_mode(positions, layout)
    single, per_sample, real, position_ids = check_tokens(spans, attention_mask, position_ids, hidden)
    windows = plan_windows(per_sample, seq, window, ratio, layout)
    score_arguments = match_arguments = None
    if windows.merges_anything:
        if guide != "none":
            guide_index, guide_count = _guide_tokens(per_sample, real, windows.samples_merging, guide)
            device = q.device
            score_arguments = (q, k, guide_index.to(device), guide_count.to(device), real, scale)
        device = hidden.device
        match_arguments = (
            hidden.reshape(batch * seq, -1),
            windows.a_rows.to(device),
            windows.a_offsets.to(device),
            windows.b_rows.to(device),
            windows.b_offsets.to(device),
        )
    return StagePlan(single, per_sample, real, position_ids, mode, windows, score_arguments, match_arguments)


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
        scale: attention logit scale, default ``1 / sqrt(d)``.
        position_ids: ``(B, S)`` or ``(3, B, S)`` input position ids; default: each real token's
            ordinal ``0, 1, ...``.
        attention_mask: ``(B, S)`` bool/int, real tokens (a contiguous run per sample, i.e. left or
            right padding); default all real. Padding is neither a query nor a guide and is dropped.
        padding_side: where the outputs are padded, ``"right"`` or ``"left"``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` for all three kernels.

    Returns:
        A :class:`~lightkv_core.compaction.StageResult`.

    Raises:
        TypeError / ValueError naming the problem: bad shapes or dtypes, spans out of range,
        overlapping or unsorted, grid size not matching a span, ``ratio`` outside ``[0, 1]``,
        ``window < 1``, query heads not a multiple of key heads, NaN/Inf in the scores or hidden states.
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
    merged_into = torch.full((batch, seq), -1, dtype=torch.long)
    scores = None
    if plan.match_arguments is not None:
        if plan.score_arguments is None:
            scores = torch.ones(batch, seq, dtype=torch.float32, device=q.device)
        else:
            scores = cross_attention_scores(*plan.score_arguments, backend=backend)
        _check_finite(plan, scores)
        best, sim = window_best_match(*plan.match_arguments, backend=backend)
        merged_into = choose_merges(plan.windows, best, sim, batch, seq)
    keep = plan.real.cpu() & (merged_into < 0)
    weights = scores if scores is not None and guide != "none" else None
    return compact(
        hidden,
        keep,
        merged_into,
        weights,
        scores,
        plan.position_ids,
        plan.per_sample,
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
    if q.dim() != 4 or q.shape[0] != batch or q.shape[2] != seq:
        raise ValueError(f"q must be (B, H, S, d) = ({batch}, H, {seq}, d), got {tuple(q.shape)}")
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


def _guide_tokens(
    per_sample: list[list[VisionSpan]], real: torch.Tensor, samples_merging: list[bool], guide: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(guide_index (B, T), guide_count (B,))`` int64 (CPU): each sample's guide tokens, none for samples that
    merge nothing."""
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
    guide_index = torch.zeros(len(per_sample), width, dtype=torch.long)
    for b, index in enumerate(guides):
        guide_index[b, : index.numel()] = index
    return guide_index, torch.tensor([g.numel() for g in guides], dtype=torch.long)


def _check_finite(plan: StagePlan, scores: torch.Tensor) -> None:
    rows, a_rows, _, b_rows, _ = plan.match_arguments
    involved = torch.cat([a_rows, b_rows])
    if not bool(torch.isfinite(scores.view(-1)[involved]).all()):
        raise ValueError("non-finite cross-attention scores (NaN/Inf in q or k of the vision or guide tokens)")
    if not bool(torch.isfinite(rows[involved]).all()):
        raise ValueError("non-finite hidden states in vision tokens")
