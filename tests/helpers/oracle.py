"""Float64 NumPy oracle for LightKV, written from the method's specification (the README's "Semantics" section).

This module is an independent, deliberately plain (loop-based) reading of the specification. It must
not import torch, triton or ``lightkv_core``: its only purpose is to check the library's fast kernels.

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

__all__ = [
    "oracle_attention_statistics",
    "oracle_cross_attention_scores",
    "oracle_merge_compact",
    "oracle_stage",
    "oracle_window_best_match",
]

_COS_EPS = 1e-8
_MERGE_EPS = 1e-8
_RATIO_EPS = 1e-9


# ----------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------


def _logsumexp(v: np.ndarray) -> float:
    """Stable logsumexp of a 1-D float64 vector (length >= 1)."""
    m = float(np.max(v))
    if not math.isfinite(m):
        # +inf or nan propagate; -inf only if every entry is -inf.
        return m
    return m + math.log(float(np.sum(np.exp(v - m))))


def _cosine(u: np.ndarray, v: np.ndarray) -> float:
    """Cosine similarity of two 1-D float64 vectors with the spec's ``+1e-8`` in the denominator."""
    nu = math.sqrt(float(np.dot(u, u)))
    nv = math.sqrt(float(np.dot(v, v)))
    return float(np.dot(u, v)) / (nu * nv + _COS_EPS)


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


def _scores_single(q: np.ndarray, k: np.ndarray, guide: list[int], query_valid: np.ndarray, scale: float) -> np.ndarray:
    """Prompt-to-vision cross-attention score for one sample.

    q (H, S, d), k (Hk, S, d) float64; guide: key token indices; query_valid (S,) bool.
    Returns a (S,) float64 with ``a[i] = sum_h sum_t exp(s q[h,i].k[g(h),t] - Z[h,t])`` for valid i,
    where ``Z[h, t]`` is the logsumexp over valid i; invalid rows are 0.
    """
    n_heads, seq, _ = q.shape
    n_kv = k.shape[0]
    group = n_heads // n_kv
    out = np.zeros(seq, dtype=np.float64)
    valid = [i for i in range(seq) if bool(query_valid[i])]
    if not guide or not valid:
        return out
    for h in range(n_heads):
        kh = h // group
        for t in guide:
            logits = scale * (q[h, valid] @ k[kh, t])  # (len(valid),)
            z = _logsumexp(logits)
            out[valid] += np.exp(logits - z)
    return out


# ----------------------------------------------------------------------------------------------------
# Kernel-level oracles
# ----------------------------------------------------------------------------------------------------


def oracle_cross_attention_scores(
    q: np.ndarray,
    k: np.ndarray,
    guide_index: np.ndarray,
    guide_count: np.ndarray,
    query_mask: np.ndarray,
    scale: float,
) -> np.ndarray:
    """Scoring kernel oracle.

    q (B, H, S, d), k (B, Hk, S, d), guide_index (B, T) int (row b uses its first guide_count[b]
    entries), guide_count (B,), query_mask (B, S) bool (False = padding: not a query, score 0).
    Returns (B, S) float64: ``a[b, i] = sum_h sum_t exp(s q[b,h,i].k[b,g(h),t] - Z[b,h,t])`` with
    ``Z[b, h, t] = logsumexp`` over the valid queries i of sample b. ``guide_count[b] == 0`` -> zeros.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    guide_index = np.asarray(guide_index)
    guide_count = np.asarray(guide_count)
    query_mask = np.asarray(query_mask, dtype=bool)
    batch, n_heads, seq, _ = q.shape
    if n_heads % k.shape[1] != 0:
        raise ValueError("H must be a multiple of Hk")
    out = np.zeros((batch, seq), dtype=np.float64)
    for b in range(batch):
        count = int(guide_count[b])
        guide = [int(guide_index[b, j]) for j in range(count)]
        out[b] = _scores_single(q[b], k[b], guide, query_mask[b], float(scale))
    return out


def oracle_window_best_match(
    x: np.ndarray,
    a_rows: np.ndarray,
    a_window: np.ndarray,
    b_rows: np.ndarray,
    b_offsets: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Window matching kernel oracle.

    x (N, D); a_rows (NA,) rows of x; a_window (NA,) window id of each A token; b_rows (NB,) rows of x
    grouped by window (window w owns b_rows[b_offsets[w]:b_offsets[w+1]]); b_offsets (NW+1,).
    Returns ``best`` (NA,) int64, the global index j into b_rows maximising the cosine (ties -> smallest
    j, -1 if the window has no B token) and ``sim`` (NA,) float64, that maximum cosine (-inf if none).
    """
    x = np.asarray(x, dtype=np.float64)
    a_rows = np.asarray(a_rows)
    a_window = np.asarray(a_window)
    b_rows = np.asarray(b_rows)
    b_offsets = np.asarray(b_offsets)
    n_a = a_rows.shape[0]
    best = np.full(n_a, -1, dtype=np.int64)
    sim = np.full(n_a, -np.inf, dtype=np.float64)
    for ia in range(n_a):
        w = int(a_window[ia])
        lo, hi = int(b_offsets[w]), int(b_offsets[w + 1])
        xa = x[int(a_rows[ia])]
        for j in range(lo, hi):
            c = _cosine(xa, x[int(b_rows[j])])
            if best[ia] < 0 or c > sim[ia]:  # strict: ties keep the smallest j
                best[ia] = j
                sim[ia] = c
    return best, sim


def oracle_merge_compact(
    x: np.ndarray,
    weights: np.ndarray,
    out_rows: np.ndarray,
    src_offsets: np.ndarray,
    src_rows: np.ndarray,
) -> np.ndarray:
    """Merge + compaction kernel oracle.

    x (N, D); weights (N,); out_rows (M,) row of x per output row (-1 = padding -> zeros);
    src_offsets (M+1,) CSR pointers into src_rows (N_src,) = rows of x merged into each output row.
    Output row m is ``x[b]`` without sources, else ``(w_b x_b + sum w_a x_a) / max(w_b + sum w_a, 1e-8)``
    with ``b = out_rows[m]``. Returns (M, D) float64.
    """
    x = np.asarray(x, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    out_rows = np.asarray(out_rows)
    src_offsets = np.asarray(src_offsets)
    src_rows = np.asarray(src_rows)
    n_out = out_rows.shape[0]
    out = np.zeros((n_out, x.shape[1]), dtype=np.float64)
    for m in range(n_out):
        b = int(out_rows[m])
        if b < 0:
            continue
        lo, hi = int(src_offsets[m]), int(src_offsets[m + 1])
        if hi <= lo:
            out[m] = x[b]
            continue
        num = weights[b] * x[b]
        den = float(weights[b])
        for j in range(lo, hi):
            s = int(src_rows[j])
            num = num + weights[s] * x[s]
            den += float(weights[s])
        out[m] = num / max(den, _MERGE_EPS)
    return out


def oracle_attention_statistics(
    q: np.ndarray,
    k: np.ndarray,
    query_index: np.ndarray,
    key_index: np.ndarray,
    key_mask: np.ndarray | None,
    causal: bool,
    scale: float,
    heads: str = "per_head",
) -> np.ndarray:
    """Attention statistics kernel oracle.

    q (B, H, S, d), k (B, Hk, S, d), query_index (B, Q) and key_index (B, C) int (-1 = unused entry),
    key_mask (B, S) bool or None (= all keys). For each used query row i the full row softmax
    ``P[b, h, i, j]`` is materialised over the allowed keys j (key_mask[b, j] and, if causal, j <= i;
    P = 0 elsewhere, a row with no allowed key is all 0). Returns float64 ``out[b, h, c] = sum_i
    P[b, h, i, key_index[b, c]]`` over the used query entries (duplicates count twice; 0 for unused
    key entries): (B, H, C), or (B, C) averaged over heads when ``heads == "mean"``.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    query_index = np.asarray(query_index)
    key_index = np.asarray(key_index)
    batch, n_heads, seq, _ = q.shape
    if n_heads % k.shape[1] != 0:
        raise ValueError("H must be a multiple of Hk")
    group = n_heads // k.shape[1]
    mask = np.ones((batch, seq), dtype=bool) if key_mask is None else np.asarray(key_mask, dtype=bool)
    out = np.zeros((batch, n_heads, key_index.shape[1]), dtype=np.float64)
    for b in range(batch):
        for h in range(n_heads):
            probs = np.zeros((seq, seq), dtype=np.float64)  # (query row, key)
            for i in range(seq):
                allowed = [j for j in range(seq) if mask[b, j] and (not causal or j <= i)]
                if not allowed:
                    continue
                logits = float(scale) * (k[b, h // group, allowed] @ q[b, h, i])
                probs[i, allowed] = np.exp(logits - _logsumexp(logits))
            for i in query_index[b]:
                if i < 0:
                    continue
                for c, j in enumerate(key_index[b]):
                    if j >= 0:
                        out[b, h, c] += probs[int(i), int(j)]
    if heads == "mean":
        return out.mean(axis=1)
    if heads != "per_head":
        raise ValueError(f"unknown heads {heads!r}")
    return out


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
        weights = _scores_single(q, k, guide_idx, np.ones(seq, dtype=bool), sc)
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
                c = _cosine(x[a], x[b])
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
        hidden[m] = num / max(den, _MERGE_EPS)

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
