"""Float64 NumPy mirrors of LightKV's kernels, and the float64 primitives they share with the stage oracle.

Part of the oracle (see :mod:`helpers.oracle`, which re-exports the kernel mirrors): an independent, deliberately
plain (loop-based) reading of the README's "Semantics" section. It must not import torch, triton or
``lightkv_core``: its only purpose is to check the library's fast kernels.

- :func:`oracle_cross_attention_scores` -- mirror of the scoring kernel (batched, padded).
- :func:`oracle_window_best_match` -- mirror of the window matching kernel.
- :func:`oracle_merge_compact` -- mirror of the merge + compaction kernel.
- :func:`oracle_attention_statistics` -- mirror of the attention statistics kernel (FastV-style).
- Shared primitives: :func:`logsumexp`, :func:`cosine`, :func:`cross_attention_scores_one_sample` and
  :data:`MERGE_EPS`.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "MERGE_EPS",
    "cosine",
    "cross_attention_scores_one_sample",
    "logsumexp",
    "oracle_attention_statistics",
    "oracle_cross_attention_scores",
    "oracle_merge_compact",
    "oracle_window_best_match",
]

COS_EPS = 1e-8
"""The ``+1e-8`` in the denominator of the cosine ``c(a, b) = x_a . x_b / (|x_a| |x_b| + 1e-8)``."""

MERGE_EPS = 1e-8
"""Floor of the weight sum a merged row is divided by: ``max(w_b + sum w_a, 1e-8)``."""


# ----------------------------------------------------------------------------------------------------
# Shared primitives
# ----------------------------------------------------------------------------------------------------


def logsumexp(v: np.ndarray) -> float:
    """Stable logsumexp of a 1-D float64 vector (length >= 1)."""
    m = float(np.max(v))
    if not math.isfinite(m):
        # +inf or nan propagate; -inf only if every entry is -inf.
        return m
    return m + math.log(float(np.sum(np.exp(v - m))))


def cosine(u: np.ndarray, v: np.ndarray) -> float:
    """Cosine similarity of two 1-D float64 vectors with the spec's ``+1e-8`` in the denominator."""
    nu = math.sqrt(float(np.dot(u, u)))
    nv = math.sqrt(float(np.dot(v, v)))
    return float(np.dot(u, v)) / (nu * nv + COS_EPS)


def cross_attention_scores_one_sample(
    q: np.ndarray, k: np.ndarray, guide: list[int], query_valid: np.ndarray, scale: float
) -> np.ndarray:
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
            z = logsumexp(logits)
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
        out[b] = cross_attention_scores_one_sample(q[b], k[b], guide, query_mask[b], float(scale))
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
            c = cosine(xa, x[int(b_rows[j])])
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
        out[m] = num / max(den, MERGE_EPS)
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
                probs[i, allowed] = np.exp(logits - logsumexp(logits))
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
