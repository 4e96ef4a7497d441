"""Attention received by selected keys from selected queries (FastV-style statistics): ``attention_statistics``.

Row softmax (causal if asked, over the keys ``key_mask`` allows), summed over the selected query rows at the
selected key columns. Two streaming passes that never materialise the ``S x S`` (nor ``Q x S``) matrix, and a
PyTorch fallback; README, "Kernels" and "Methods".
"""

from __future__ import annotations

import torch

from lightkv_core.kernels.launch import (
    FP_FUSION,
    TRITON_AVAILABLE,
    check_attention,
    check_index,
    check_rows,
    check_same_device,
    check_scale,
    choose_backend,
    dot_mode,
    next_power_of_2,
    softmax_scale,
)
from lightkv_core.kernels.tuning import bucket, dtype_name, launch_config

HEAD_MODES = ("per_head", "mean")

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from lightkv_core.kernels.launch import dot_f32

    @triton.jit
    def _load_query_rows(q_head_ptr, index_ptr, q_offs, Q, d_offs, d_valid, sqs, sqd):
        """Rows ``index_ptr[q_offs]`` of one head: ``(BLOCK_Q, BLOCK_D)`` queries (0 where unused), their
        positions ``(BLOCK_Q,)`` (0 where unused) and whether each is used."""
        rows = tl.load(index_ptr + q_offs, mask=q_offs < Q, other=-1)
        used = rows >= 0
        rows = tl.where(used, rows, 0)
        tile = tl.load(
            q_head_ptr + rows[:, None] * sqs + d_offs[None, :] * sqd,
            mask=used[:, None] & d_valid[None, :],
            other=0.0,
        )
        return tile, rows, used

    @triton.jit
    def row_lse_kernel(
        q_ptr,
        k_ptr,
        qidx_ptr,
        mask_ptr,
        lse_ptr,
        S,
        H,
        GROUP,
        HEAD_DIM,
        Q,
        C,
        scale,
        sqb,
        sqh,
        sqs,
        sqd,
        skb,
        skh,
        sks,
        skd,
        CAUSAL: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_MODE: tl.constexpr,
    ):
        """Pass 1: LSE[b, h, q] for one (sample, head) and one tile of query entries (+inf where the
        entry is unused or its row has no allowed key)."""
        pid_bh = tl.program_id(0)
        pid_q = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: b * sqb passes 2**31 on large batches
        h = pid_bh % H
        kv_head = h // GROUP
        q_offs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        d_offs = tl.arange(0, BLOCK_D)
        d_valid = d_offs < HEAD_DIM
        q_tile, rows, used = _load_query_rows(
            q_ptr + b * sqb + h * sqh, qidx_ptr + b * Q, q_offs, Q, d_offs, d_valid, sqs, sqd
        )
        k_head_ptr = k_ptr + b * skb + kv_head * skh
        stop = S
        if CAUSAL:
            stop = tl.minimum(tl.max(tl.where(used, rows, -1), axis=0) + 1, S)
        running_max = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_Q], tl.float32)
        for k_start in range(0, stop, BLOCK_K):
            k_offs = k_start + tl.arange(0, BLOCK_K)
            k_valid = tl.load(mask_ptr + b * S + k_offs, mask=k_offs < S, other=0) != 0
            k_tile = tl.load(
                k_head_ptr + k_offs[None, :] * sks + d_offs[:, None] * skd,
                mask=d_valid[:, None] & k_valid[None, :],
                other=0.0,
            )
            allowed = used[:, None] & k_valid[None, :]
            if CAUSAL:
                allowed = allowed & (k_offs[None, :] <= rows[:, None])
            logits = tl.where(allowed, dot_f32(q_tile, k_tile, DOT_MODE) * scale, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(logits, axis=1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(
                tl.exp(logits - safe_max[:, None]), axis=1
            )
            running_max = new_max
        has_key = running_sum > 0.0
        lse = tl.where(has_key, running_max + tl.log(tl.where(has_key, running_sum, 1.0)), float("inf"))
        tl.store(lse_ptr + (b * H + h) * Q + q_offs, lse, mask=q_offs < Q)

    @triton.jit
    def column_sum_kernel(
        q_ptr,
        k_ptr,
        qidx_ptr,
        kidx_ptr,
        mask_ptr,
        lse_ptr,
        out_ptr,
        S,
        H,
        GROUP,
        HEAD_DIM,
        Q,
        C,
        scale,
        sqb,
        sqh,
        sqs,
        sqd,
        skb,
        skh,
        sks,
        skd,
        CAUSAL: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_MODE: tl.constexpr,
    ):
        """Pass 2: out[b, h, c] for one (sample, head) and one tile of key entries, summed over every
        query entry."""
        pid_bh = tl.program_id(0)
        pid_c = tl.program_id(1)
        b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: b * sqb passes 2**31 on large batches
        h = pid_bh % H
        kv_head = h // GROUP
        c_offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        cols = tl.load(kidx_ptr + b * C + c_offs, mask=c_offs < C, other=-1)
        col_used = cols >= 0
        cols = tl.where(col_used, cols, 0)
        col_valid = col_used & (tl.load(mask_ptr + b * S + cols, mask=col_used, other=0) != 0)
        d_offs = tl.arange(0, BLOCK_D)
        d_valid = d_offs < HEAD_DIM
        k_tile = tl.load(
            k_ptr + b * skb + kv_head * skh + cols[None, :] * sks + d_offs[:, None] * skd,
            mask=d_valid[:, None] & col_valid[None, :],
            other=0.0,
        )
        total = tl.zeros([BLOCK_C], tl.float32)
        for q_start in range(0, Q, BLOCK_Q):
            q_offs = q_start + tl.arange(0, BLOCK_Q)
            q_tile, rows, used = _load_query_rows(
                q_ptr + b * sqb + h * sqh, qidx_ptr + b * Q, q_offs, Q, d_offs, d_valid, sqs, sqd
            )
            lse = tl.load(lse_ptr + (b * H + h) * Q + q_offs, mask=q_offs < Q, other=float("inf"))
            allowed = used[:, None] & col_valid[None, :]
            if CAUSAL:
                allowed = allowed & (cols[None, :] <= rows[:, None])
            logits = dot_f32(q_tile, k_tile, DOT_MODE) * scale
            total += tl.sum(tl.where(allowed, tl.exp(logits - lse[:, None]), 0.0), axis=0)
        tl.store(out_ptr + (b * H + h) * C + c_offs, total, mask=c_offs < C)


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    key_mask: torch.Tensor | None,
    heads: str,
    check_indices: bool,
) -> None:
    op = "attention_statistics"
    check_attention(op, q, k)
    check_index(op, "query_index", query_index, 2)
    check_index(op, "key_index", key_index, 2)
    batch, _, seq, _ = q.shape
    if query_index.shape[0] != batch:
        raise ValueError(f"{op}: query_index must be (B, Q) with B = {batch}, got {tuple(query_index.shape)}")
    if key_index.shape[0] != batch:
        raise ValueError(f"{op}: key_index must be (B, C) with B = {batch}, got {tuple(key_index.shape)}")
    tensors = dict(q=q, k=k, query_index=query_index, key_index=key_index)
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool:
            raise TypeError(f"{op}: key_mask must be a bool tensor or None")
        if tuple(key_mask.shape) != (batch, seq):
            raise ValueError(f"{op}: key_mask must be (B, S) = ({batch}, {seq}), got {tuple(key_mask.shape)}")
        tensors["key_mask"] = key_mask
    check_same_device(op, **tensors)
    if check_indices:
        check_rows(op, "query_index", query_index, seq, lowest=-1)
        check_rows(op, "key_index", key_index, seq, lowest=-1)
    if heads not in HEAD_MODES:
        raise ValueError(f"{op}: heads must be one of {HEAD_MODES}, got {heads!r}")


def attention_statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    *,
    key_mask: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    heads: str = "per_head",
    backend: str = "auto",
    check_indices: bool = True,
) -> torch.Tensor:
    """Post-softmax attention that selected key columns receive, summed over selected query rows::

        LSE[b, h, i] = logsumexp_{j allowed}( s * q[b, h, i] . k[b, g(h), j] )
        out[b, h, c] = sum_{i in query_index[b]} exp( s * q[b, h, i] . k[b, g(h), key_index[b, c]] - LSE[b, h, i] )

    where key ``j`` is allowed for row ``i`` if ``key_mask[b, j]`` and, if causal, ``j <= i`` (a key not allowed
    adds 0; a row with no allowed key adds nothing).

    Args:
        q: ``(B, H, S, d)`` post-RoPE queries (fp16/bf16/fp32, any strides).
        k: ``(B, Hk, S, d)`` post-RoPE keys, same dtype; ``H % Hk == 0`` (GQA: head ``h`` reads key head
            ``h // (H // Hk)``).
        query_index: ``(B, Q)`` int, the query rows (positions in ``S``) to sum over; ``-1`` marks an
            unused entry. Repeated rows count once per entry.
        key_index: ``(B, C)`` int, the key columns to report; ``-1`` marks an unused entry (reports 0).
        key_mask: ``(B, S)`` bool, keys that take part in every row's softmax; ``None`` = all ``S``.
        causal: query at position ``i`` sees only keys ``j <= i``.
        scale: logit scale, a finite number ``> 0``; default ``1 / sqrt(d)``.
        heads: ``"per_head"`` (output ``(B, H, C)``) or ``"mean"`` (``(B, C)``, mean over the ``H`` heads).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        check_indices: check that every index lies in ``[-1, S)``, which reads them back from the device (a host
            synchronisation); ``False`` only for index lists the caller built in range itself.

    Returns:
        float32 ``out[b, h, c]`` (or its mean over ``h``): the sum over the used query entries of the row
        softmax probability of key ``key_index[b, c]``. Each used query row with at least one allowed key
        contributes probabilities summing to 1 over all ``S`` keys; a row without one contributes 0.
    """
    _check(q, k, query_index, key_index, key_mask, heads, check_indices)
    scale = softmax_scale("attention_statistics", scale, q.shape[-1])
    which = choose_backend(backend, q.device, "attention_statistics")
    batch, n_heads, seq, _ = q.shape
    if key_mask is None:
        key_mask = torch.ones(batch, seq, dtype=torch.bool, device=q.device)
    if batch * seq * query_index.shape[1] * key_index.shape[1] == 0:
        out = torch.zeros(batch, n_heads, key_index.shape[1], dtype=torch.float32, device=q.device)
    elif which == "torch":
        out = attention_statistics_torch(q, k, query_index, key_index, key_mask, bool(causal), scale)
    else:
        out = attention_statistics_triton(q, k, query_index, key_index, key_mask, bool(causal), scale)
    return out.mean(dim=1) if heads == "mean" else out


def attention_statistics_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    key_mask: torch.Tensor,
    causal: bool,
    scale: float,
    configs: tuple[dict[str, int], dict[str, int]] | None = None,
) -> torch.Tensor:
    """Launch both passes with ``configs`` (pass 1, pass 2), by default the tuned or default ones."""
    scale = check_scale("attention_statistics_triton", scale)
    batch, n_heads, seq, head_dim = q.shape
    n_query, n_key = query_index.shape[1], key_index.shape[1]
    if configs is None:
        shape = {"Q": bucket(n_query), "H": n_heads, "d": head_dim, "dtype": dtype_name(q.dtype)}
        configs = (
            launch_config("attention_stats.row_lse", q.device, S=bucket(seq), **shape),
            launch_config("attention_stats.column_sum", q.device, C=bucket(n_key), **shape),
        )
    lse_config, sum_config = configs
    rows = query_index.to(torch.int32).contiguous()
    cols = key_index.to(torch.int32).contiguous()
    mask = key_mask.to(torch.int8).contiguous()
    lse = torch.empty(batch, n_heads, n_query, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, n_heads, n_key, dtype=torch.float32, device=q.device)
    common = (
        seq,
        n_heads,
        n_heads // k.shape[1],
        head_dim,
        n_query,
        n_key,
        scale,
        *q.stride(),
        *k.stride(),
    )
    fixed = dict(
        CAUSAL=causal,
        BLOCK_D=max(16, next_power_of_2(head_dim)),
        DOT_MODE=dot_mode(q.dtype),
        enable_fp_fusion=FP_FUSION,
    )
    row_lse_kernel[(batch * n_heads, triton.cdiv(n_query, lse_config["BLOCK_Q"]))](
        q, k, rows, mask, lse, *common, **lse_config, **fixed
    )
    column_sum_kernel[(batch * n_heads, triton.cdiv(n_key, sum_config["BLOCK_C"]))](
        q, k, rows, cols, mask, lse, out, *common, **sum_config, **fixed
    )
    return out


def attention_statistics_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    key_mask: torch.Tensor,
    causal: bool,
    scale: float,
    max_chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """Fallback: the same two passes, chunked over query entries (at most ``max_chunk_elements`` logits
    live). Each chunk's ``(B, H, chunk, S)`` logits give its rows' log-sum-exp, then its selected columns
    are read from the same logits."""
    scale = check_scale("attention_statistics_torch", scale)
    batch, n_heads, seq, head_dim = q.shape
    kv_heads = k.shape[1]
    group = n_heads // kv_heads
    n_query, n_key = query_index.shape[1], key_index.shape[1]
    keys_t = k.float().transpose(2, 3)  # (B, Hk, d, S)
    q_rows = q.transpose(1, 2)  # (B, S, H, d), a view
    sample = torch.arange(batch, device=q.device)[:, None]
    positions = torch.arange(seq, device=q.device)
    col_used = key_index >= 0
    cols = key_index.clamp(min=0).long()  # (B, C)
    col_valid = col_used & key_mask.gather(1, cols)  # (B, C)
    out = torch.zeros(batch, n_heads, n_key, dtype=torch.float32, device=q.device)
    chunk = max(1, max_chunk_elements // (batch * n_heads * seq))
    for start in range(0, n_query, chunk):
        part = query_index[:, start : start + chunk]
        used = part >= 0  # (B, c)
        rows = part.clamp(min=0).long()
        width = rows.shape[1]
        queries = q_rows[sample, rows].float()  # (B, c, H, d)
        queries = queries.permute(0, 2, 1, 3).reshape(batch, kv_heads, group * width, head_dim)
        logits = torch.matmul(queries, keys_t).view(batch, n_heads, width, seq) * scale
        allowed = used[:, :, None] & key_mask[:, None, :]  # (B, c, S)
        if causal:
            allowed = allowed & (positions[None, None, :] <= rows[:, :, None])
        lse = torch.logsumexp(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1)  # (B, H, c)
        picked = logits.gather(3, cols[:, None, None, :].expand(batch, n_heads, width, n_key))  # (B, H, c, C)
        picked_allowed = used[:, :, None] & col_valid[:, None, :]  # (B, c, C)
        if causal:
            picked_allowed = picked_allowed & (cols[:, None, :] <= rows[:, :, None])
        probs = torch.exp(picked - lse[..., None]).masked_fill(~picked_allowed[:, None], 0.0)
        out += probs.sum(dim=2)
    return out
