"""Float64 NumPy oracle for LightKV, written from the method's specification (the README's "Semantics" section).

The oracle (this module and :mod:`helpers.oracle_kernels`) is an independent, deliberately plain (loop-based)
reading of the specification. It must not import torch, triton or ``lightkv_core``: its only purpose is to check
the library's fast kernels. This module holds the whole-stage oracle and re-exports the kernel mirrors, so tests
import every oracle from here.

Public functions
----------------
- :func:`oracle_stage` -- one full compression stage for a single sample.
- :func:`oracle_cross_attention_scores` -- mirror of the scoring kernel (batched, padded).
- :func:`oracle_window_best_match` -- mirror of the window matching kernel.
- :func:`oracle_merge_compact` -- mirror of the merge + compaction kernel.
- :func:`oracle_attention_statistics` -- mirror of the attention statistics kernel (FastV-style).

Conventions fixed on top of the spec text:

- ``r = min(floor(rho * n + 1e-9), n // 2)`` for a window of ``n`` mergeable tokens.
- ``best(a)`` ties go to the B token that comes first in the window order; among equal ``m(a)`` the A
  token that comes first in the window order is chosen first.
- ``c(a, b) = x_a . x_b / (|x_a| |x_b| + 1e-8)``.
- Default layout: windows from the original raster coordinate ``row * cols + col``; an image with
  fewer than ``8 W^2`` mergeable tokens is left unchanged. Reference layout: each image's current
  mergeable tokens are laid out in sequence order in a square of side ``ceil(sqrt(n))``; if any image
  has fewer than ``8 W^2`` mergeable tokens the whole stage is skipped for the sample.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from helpers.oracle_kernels import (
    MERGE_EPS,
    cosine,
    cross_attention_scores_one_sample,
    oracle_attention_statistics,
    oracle_cross_attention_scores,
    oracle_merge_compact,
    oracle_window_best_match,
)

__all__ = [
    "oracle_attention_statistics",
    "oracle_cross_attention_scores",
    "oracle_merge_compact",
    "oracle_stage",
    "oracle_window_best_match",
]

_RATIO_EPS = 1e-9


# ----------------------------------------------------------------------------------------------------
# Window helpers
# ----------------------------------------------------------------------------------------------------


def _band_of(length: int, w: int) -> list[int]:
    """Band index of every coordinate ``0..length-1`` when ``length`` is cut into ``w`` bands.

    The first ``length % w`` bands have ``length // w + 1`` entries, the others ``length // w``
    (bands may be empty when ``length < w``). Returns a list of length ``length``.
    """
    base, extra = divmod(length, w)
    out: list[int] = []
    for band in range(w):
        size = base + 1 if band < extra else base
        out.extend([band] * size)
    assert len(out) == length
    return out


def _num_merged(ratio: float, n: int) -> int:
    """Number ``r`` of A tokens that merge in a window with ``n`` mergeable tokens."""
    return min(math.floor(ratio * n + _RATIO_EPS), n // 2)


# ----------------------------------------------------------------------------------------------------
# Stage oracle
# ----------------------------------------------------------------------------------------------------


def _normalise_spans(spans: list[dict[str, Any]], seq: int) -> list[dict[str, Any]]:
    """Validate spans and fill in default coords / mergeable. Returns new dicts."""
    out: list[dict[str, Any]] = []
    prev_end = 0
    for sp in spans:
        start, end = int(sp["start"]), int(sp["end"])
        rows, cols = int(sp["rows"]), int(sp["cols"])
        if start < 0 or end > seq or start > end:
            raise ValueError(f"span [{start}, {end}) out of range for S={seq}")
        if start < prev_end:
            raise ValueError("spans must be sorted and non-overlapping")
        prev_end = end
        if rows < 1 or cols < 1:
            raise ValueError("span rows and cols must be >= 1")
        length = end - start
        coords_in = sp.get("coords")
        if coords_in is None:
            if length != rows * cols:
                raise ValueError("span without coords must have end - start == rows * cols")
            coords = list(range(length))
        else:
            coords = [int(c) for c in coords_in]
            if len(coords) != length:
                raise ValueError("len(coords) must equal end - start")
        merge_in = sp.get("mergeable")
        if merge_in is None:
            mergeable = [True] * length
        else:
            mergeable = [bool(m) for m in merge_in]
            if len(mergeable) != length:
                raise ValueError("len(mergeable) must equal end - start")
        seen: set[int] = set()
        for c, mg in zip(coords, mergeable, strict=True):
            if c < 0 or c >= rows * cols:
                raise ValueError("coords out of [0, rows * cols)")
            if mg:
                if c in seen:
                    raise ValueError("duplicated coords among mergeable tokens")
                seen.add(c)
        out.append({"start": start, "end": end, "rows": rows, "cols": cols, "coords": coords, "mergeable": mergeable})
    return out


def _windows_default(span: dict[str, Any], w: int) -> dict[int, list[int]]:
    """Default layout: window id -> mergeable token indices (absolute) in ascending original raster order."""
    rows, cols = span["rows"], span["cols"]
    band_r = _band_of(rows, w)
    band_c = _band_of(cols, w)
    windows: dict[int, list[tuple[int, int]]] = {}
    for off, (c, mg) in enumerate(zip(span["coords"], span["mergeable"], strict=True)):
        if not mg:
            continue
        r_, c_ = divmod(c, cols)
        wid = band_r[r_] * w + band_c[c_]
        windows.setdefault(wid, []).append((c, span["start"] + off))
    return {wid: [tok for _, tok in sorted(toks)] for wid, toks in windows.items()}


def _windows_reference(span: dict[str, Any], w: int) -> dict[int, list[int]]:
    """Reference layout: square of side ceil(sqrt(n)) filled in sequence order; window -> token indices."""
    toks = [span["start"] + off for off, mg in enumerate(span["mergeable"]) if mg]
    n = len(toks)
    if n == 0:
        return {}
    side = math.isqrt(n - 1) + 1
    band = _band_of(side, w)
    windows: dict[int, list[int]] = {}
    for j, tok in enumerate(toks):
        wid = band[j // side] * w + band[j % side]
        windows.setdefault(wid, []).append(tok)
    return windows


def oracle_stage(
    x: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    spans: list[dict[str, Any]],
    window: int,
    ratio: float,
    *,
    guide: str = "all_text",
    layout: str = "default",
    positions_mode: str | None = None,
    position_ids: np.ndarray | None = None,
    scale: float | None = None,
) -> dict[str, Any]:
    """One LightKV compression stage for a single sample, in float64.

    x (S, D) hidden states; q (H, S, d), k (Hk, S, d) post-RoPE queries/keys; spans: list of dicts with
    start, end, rows, cols and optional coords (list[int], original raster index per token) and
    mergeable (list[bool]). position_ids: None (-> arange(S)), (S,) or (3, S).

    Returns a dict:
      hidden (S', D) float64; kept list[int] input indices of survivors (ascending);
      spans list of dicts (start, end, rows, cols, coords, mergeable) in the new sequence;
      positions int64 (S',) or (3, S'); merges dict A input index -> B input index;
      scores (S,) float64 merge weights a[i] (0 for non-vision tokens).
    """
    # ---- validation -------------------------------------------------------------------------------
    if guide not in ("all_text", "prompt", "none"):
        raise ValueError(f"unknown guide {guide!r}")
    if layout not in ("default", "reference"):
        raise ValueError(f"unknown layout {layout!r}")
    if positions_mode is None:
        positions_mode = "original" if layout == "default" else "compact"
    if positions_mode not in ("original", "compact"):
        raise ValueError(f"unknown positions mode {positions_mode!r}")
    x = np.asarray(x, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    if x.ndim != 2 or q.ndim != 3 or k.ndim != 3:
        raise ValueError("expected x (S, D), q (H, S, d), k (Hk, S, d)")
    seq = x.shape[0]
    if q.shape[1] != seq or k.shape[1] != seq or q.shape[2] != k.shape[2]:
        raise ValueError("q / k shapes do not match x")
    n_heads, n_kv = q.shape[0], k.shape[0]
    if n_kv < 1 or n_heads % n_kv != 0:
        raise ValueError("H must be a multiple of Hk")
    if not (isinstance(window, (int, np.integer)) and int(window) >= 1):
        raise ValueError("window must be an integer >= 1")
    w = int(window)
    ratio = float(ratio)
    if not (0.0 <= ratio <= 1.0):
        raise ValueError("ratio must be in [0, 1]")
    if position_ids is None:
        pos = np.arange(seq, dtype=np.int64)
    else:
        pos = np.asarray(position_ids).astype(np.int64)
        if not (pos.shape == (seq,) or pos.shape == (3, seq)):
            raise ValueError("position_ids must have shape (S,) or (3, S)")
    sp_list = _normalise_spans(spans, seq)

    # ---- scores -----------------------------------------------------------------------------------
    in_span = np.zeros(seq, dtype=bool)
    for sp in sp_list:
        in_span[sp["start"] : sp["end"]] = True
    if guide == "none":
        weights = np.ones(seq, dtype=np.float64)
    else:
        last_end = sp_list[-1]["end"] if sp_list else 0
        if guide == "all_text":
            guide_idx = [i for i in range(seq) if not in_span[i]]
        else:
            guide_idx = [i for i in range(seq) if not in_span[i] and i >= last_end]
        if not guide_idx:
            raise ValueError(f"guide {guide!r} selects no tokens")
        sc = 1.0 / math.sqrt(q.shape[2]) if scale is None else float(scale)
        weights = cross_attention_scores_one_sample(q, k, guide_idx, np.ones(seq, dtype=bool), sc)
    scores = np.where(in_span, weights, 0.0)
    if not np.all(np.isfinite(scores)):
        raise ValueError("non-finite scores")

    # ---- windows ----------------------------------------------------------------------------------
    threshold = 8 * w * w
    n_merge = [sum(sp["mergeable"]) for sp in sp_list]
    all_windows: list[list[int]] = []  # each: token indices in window order
    if layout == "default":
        for sp, n_img in zip(sp_list, n_merge, strict=True):
            if n_img < threshold:
                continue
            wins = _windows_default(sp, w)
            all_windows.extend(wins[wid] for wid in sorted(wins))
    else:
        if all(n_img >= threshold for n_img in n_merge):
            for sp in sp_list:
                wins = _windows_reference(sp, w)
                all_windows.extend(wins[wid] for wid in sorted(wins))

    # ---- bipartite matching -----------------------------------------------------------------------
    merges: dict[int, int] = {}
    for toks in all_windows:
        n = len(toks)
        r = _num_merged(ratio, n)
        if r == 0:
            continue
        a_set = toks[0::2]
        b_set = toks[1::2]
        cand: list[tuple[float, int, int, int]] = []  # (m(a), position in A, a, best b)
        for pa, a in enumerate(a_set):
            best_b, best_c = -1, -math.inf
            for b in b_set:
                c = cosine(x[a], x[b])
                if best_b < 0 or c > best_c:
                    best_b, best_c = b, c
            cand.append((best_c, pa, a, best_b))
        cand.sort(key=lambda t: (-t[0], t[1]))
        for _, _, a, b in cand[:r]:
            merges[a] = b

    # ---- merge ------------------------------------------------------------------------------------
    received: dict[int, list[int]] = {}
    for a, b in merges.items():
        received.setdefault(b, []).append(a)
    kept = [i for i in range(seq) if i not in merges]
    hidden = np.zeros((len(kept), x.shape[1]), dtype=np.float64)
    for m, i in enumerate(kept):
        srcs = received.get(i)
        if not srcs:
            hidden[m] = x[i]
            continue
        num = scores[i] * x[i]
        den = float(scores[i])
        for a in sorted(srcs):
            num = num + scores[a] * x[a]
            den += float(scores[a])
        hidden[m] = num / max(den, MERGE_EPS)

    # ---- new spans and positions ------------------------------------------------------------------
    new_index = {old: new for new, old in enumerate(kept)}
    new_spans: list[dict[str, Any]] = []
    for sp in sp_list:
        surv = [off for off in range(sp["end"] - sp["start"]) if sp["start"] + off not in merges]
        # An empty span starts where the next survivor after it lands.
        new_start = new_index[sp["start"] + surv[0]] if surv else sum(1 for i in kept if i < sp["start"])
        new_spans.append(
            {
                "start": new_start,
                "end": new_start + len(surv),
                "rows": sp["rows"],
                "cols": sp["cols"],
                "coords": [sp["coords"][off] for off in surv],
                "mergeable": [sp["mergeable"][off] for off in surv],
            }
        )
    n_out = len(kept)
    if positions_mode == "original":
        positions = pos[..., np.asarray(kept, dtype=np.int64)].astype(np.int64)
    elif pos.ndim == 1:
        positions = np.arange(n_out, dtype=np.int64)
    else:
        positions = np.tile(np.arange(n_out, dtype=np.int64), (3, 1))

    return {
        "hidden": hidden,
        "kept": kept,
        "spans": new_spans,
        "positions": positions,
        "merges": merges,
        "scores": scores,
    }
