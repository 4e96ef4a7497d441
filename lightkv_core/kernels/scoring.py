"""Prompt-to-vision cross-attention scoring (README, "Semantics" and "Kernels").

For every head and guide token the attention column is normalised over all real queries of the sample, with no
causal mask, and every row then sums its probabilities (spec section 1). Two streaming Triton passes, neither of
which materialises the ``S x S`` (or even ``S x T``) matrix, and a PyTorch fallback; tile sizes from
:mod:`lightkv_core.kernels.tuning`.
"""

from __future__ import annotations

import torch

from lightkv_core.kernels.launch import (
    FP_FUSION,
    TRITON_AVAILABLE,
    check_attention,
    check_index,
    check_same_device,
    check_scale,
    choose_backend,
    dot_mode,
    next_power_of_2,
    softmax_scale,
)
from lightkv_core.kernels.tuning import bucket, dtype_name, launch_config

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from lightkv_core.kernels.launch import dot_f32

    @triton.jit
    def _load_query_tile(q_head_ptr, s_offs, s_valid, d_offs, d_valid, sqs, sqd):
        """``(BLOCK_S, BLOCK_D)`` queries of one head; rows of padding read as 0."""
        return tl.load(
            q_head_ptr + s_offs[:, None] * sqs + d_offs[None, :] * sqd,
            mask=s_valid[:, None] & d_valid[None, :],
            other=0.0,
        )

    @triton.jit
    def _load_guide_keys(k_head_ptr, guide_ptr, t_offs, t_valid, d_offs, d_valid, sks, skd):
        """``(BLOCK_D, BLOCK_T)`` transposed keys of the guide tokens ``guide_ptr[t_offs]`` of one head."""
        t_idx = tl.load(guide_ptr + t_offs, mask=t_valid, other=0)
        return tl.load(
            k_head_ptr + t_idx[None, :] * sks + d_offs[:, None] * skd,
            mask=d_valid[:, None] & t_valid[None, :],
            other=0.0,
        )

    @triton.jit
    def column_lse_kernel(
        q_ptr,
        k_ptr,
        guide_ptr,
        count_ptr,
        mask_ptr,
        lse_ptr,
        S,
        H,
        GROUP,
        HEAD_DIM,
        T,
        NUM_SPLITS,
        scale,
        sqb,
        sqh,
        sqs,
        sqd,
        skb,
        skh,
        sks,
        skd,
        BLOCK_S: tl.constexpr,
        BLOCK_T: tl.constexpr,
        SPLIT_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_MODE: tl.constexpr,
    ):
        """Pass 1: the log-sum-exp of one chunk of ``SPLIT_S`` queries, for one (sample, head) and one tile of
        guide tokens (``-inf`` where the chunk holds no real query). One partial per chunk
        (``B * H * ceil(S / SPLIT_S) * T`` floats) lets a short prompt with few heads still fill the GPU."""
        pid_bh = tl.program_id(0)
        pid_t = tl.program_id(1)
        split = tl.program_id(2)
        b = (pid_bh // H).to(tl.int64)  # 64-bit offsets: b * sqb passes 2**31 on large batches
        h = pid_bh % H
        kv_head = h // GROUP
        count = tl.load(count_ptr + b)
        t_offs = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        t_valid = t_offs < count
        d_offs = tl.arange(0, BLOCK_D)
        d_valid = d_offs < HEAD_DIM
        k_tile = _load_guide_keys(
            k_ptr + b * skb + kv_head * skh, guide_ptr + b * T, t_offs, t_valid, d_offs, d_valid, sks, skd
        )
        running_max = tl.full([BLOCK_T], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_T], tl.float32)
        s_stop = tl.minimum(S, (split + 1) * SPLIT_S)
        for s_start in range(split * SPLIT_S, s_stop, BLOCK_S):
            s_offs = s_start + tl.arange(0, BLOCK_S)
            s_valid = tl.load(mask_ptr + b * S + s_offs, mask=s_offs < s_stop, other=0) != 0
            q_tile = _load_query_tile(q_ptr + b * sqb + h * sqh, s_offs, s_valid, d_offs, d_valid, sqs, sqd)
            logits = dot_f32(q_tile, k_tile, DOT_MODE)
            logits = tl.where(s_valid[:, None], logits * scale, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(logits, axis=0))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(
                tl.exp(logits - safe_max[None, :]), axis=0
            )
            running_max = new_max
        seen = running_sum > 0.0
        lse = tl.where(seen, running_max + tl.log(tl.where(seen, running_sum, 1.0)), float("-inf"))
        tl.store(lse_ptr + ((b * H + h) * NUM_SPLITS + split) * T + t_offs, lse, mask=t_valid)

    @triton.jit
    def _combined_lse(lse_head_ptr, t_offs, t_valid, T, NUM_SPLITS):
        """``Z`` of one head for a tile of guide tokens from its ``NUM_SPLITS`` partials (``+inf`` where unused)."""
        top = tl.full(t_offs.shape, float("-inf"), tl.float32)
        total = tl.zeros(t_offs.shape, tl.float32)
        for split in range(0, NUM_SPLITS):
            part = tl.load(lse_head_ptr + split * T + t_offs, mask=t_valid, other=float("-inf"))
            new_top = tl.maximum(top, part)
            safe_top = tl.where(new_top == float("-inf"), 0.0, new_top)
            total = total * tl.exp(top - safe_top) + tl.exp(part - safe_top)
            top = new_top
        seen = total > 0.0
        lse = tl.where(seen, top + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
        return tl.where(t_valid, lse, float("inf"))

    @triton.jit
    def row_sum_kernel(
        q_ptr,
        k_ptr,
        guide_ptr,
        count_ptr,
        mask_ptr,
        lse_ptr,
        out_ptr,
        S,
        H,
        GROUP,
        HEAD_DIM,
        T,
        NUM_SPLITS,
        scale,
        sqb,
        sqh,
        sqs,
        sqd,
        skb,
        skh,
        sks,
        skd,
        BLOCK_S: tl.constexpr,
        BLOCK_T: tl.constexpr,
        HEADS_PER_PROGRAM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        DOT_MODE: tl.constexpr,
    ):
        """Pass 2: the part of a[b, i] from ``HEADS_PER_PROGRAM`` heads, for one tile of query rows, summed over
        those heads and all guide tokens, with ``Z`` combined from pass 1's partials. The partial row sums
        (``B * ceil(H / HEADS_PER_PROGRAM) * S`` floats) are added up after the launch."""
        b = tl.program_id(0).to(tl.int64)  # 64-bit offsets: b * sqb passes 2**31 on large batches
        pid_s = tl.program_id(1)
        head_block = tl.program_id(2)
        count = tl.load(count_ptr + b)
        s_offs = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        s_valid = tl.load(mask_ptr + b * S + s_offs, mask=s_offs < S, other=0) != 0
        d_offs = tl.arange(0, BLOCK_D)
        d_valid = d_offs < HEAD_DIM
        total = tl.zeros([BLOCK_S], tl.float32)
        for h in range(head_block * HEADS_PER_PROGRAM, tl.minimum(H, (head_block + 1) * HEADS_PER_PROGRAM)):
            kv_head = h // GROUP
            q_tile = _load_query_tile(q_ptr + b * sqb + h * sqh, s_offs, s_valid, d_offs, d_valid, sqs, sqd)
            for t_start in range(0, count, BLOCK_T):
                t_offs = t_start + tl.arange(0, BLOCK_T)
                t_valid = t_offs < count
                k_tile = _load_guide_keys(
                    k_ptr + b * skb + kv_head * skh, guide_ptr + b * T, t_offs, t_valid, d_offs, d_valid, sks, skd
                )
                lse = _combined_lse(lse_ptr + (b * H + h) * NUM_SPLITS * T, t_offs, t_valid, T, NUM_SPLITS)
                logits = dot_f32(q_tile, k_tile, DOT_MODE)
                total += tl.sum(tl.exp(logits * scale - lse[None, :]), axis=1)
        total = tl.where(s_valid, total, 0.0)
        tl.store(out_ptr + (b * tl.num_programs(2) + head_block) * S + s_offs, total, mask=s_offs < S)


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    guide_index: torch.Tensor,
    guide_count: torch.Tensor,
    query_mask: torch.Tensor,
    check_indices: bool,
) -> None:
    op = "cross_attention_scores"
    check_attention(op, q, k)
    check_index(op, "guide_index", guide_index, 2)
    check_index(op, "guide_count", guide_count, 1)
    if not isinstance(query_mask, torch.Tensor) or query_mask.dtype != torch.bool:
        raise TypeError(f"{op}: query_mask must be a bool tensor")
    batch, _, seq, _ = q.shape
    if guide_index.shape[0] != batch or tuple(guide_count.shape) != (batch,):
        raise ValueError(f"{op}: guide_index must be (B, T) and guide_count (B,) with B = {batch}")
    if tuple(query_mask.shape) != (batch, seq):
        raise ValueError(f"{op}: query_mask must be (B, S) = ({batch}, {seq}), got {tuple(query_mask.shape)}")
    check_same_device(op, q=q, k=k, guide_index=guide_index, guide_count=guide_count, query_mask=query_mask)
    if not check_indices:
        return
    counts = guide_count.tolist()
    if any(c < 0 or c > guide_index.shape[1] for c in counts):
        raise ValueError(f"{op}: guide_count must lie in [0, {guide_index.shape[1]}], got {counts}")
    for b, c in enumerate(counts):
        used = guide_index[b, :c]
        if c and (int(used.min()) < 0 or int(used.max()) >= seq):
            raise ValueError(f"{op}: guide_index of sample {b} out of range [0, {seq})")


def cross_attention_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    guide_index: torch.Tensor,
    guide_count: torch.Tensor,
    query_mask: torch.Tensor,
    scale: float | None = None,
    *,
    backend: str = "auto",
    check_indices: bool = True,
) -> torch.Tensor:
    """Prompt-to-vision cross-attention score of every token::

        Z[h, t] = logsumexp_i( s * q[h, i] . k[g(h), t] )          i over the sample's real queries
        a[i]    = sum_h sum_t exp( s * q[h, i] . k[g(h), t] - Z[h, t] )

    Args:
        q: ``(B, H, S, d)`` post-RoPE queries (fp16/bf16/fp32, any strides).
        k: ``(B, Hk, S, d)`` post-RoPE keys, same dtype; ``H % Hk == 0`` (GQA: head ``h`` reads key head
            ``h // (H // Hk)``).
        guide_index: ``(B, T)`` int, the guide tokens of each sample (row ``b`` uses its first
            ``guide_count[b]`` entries; the rest is padding).
        guide_count: ``(B,)`` int, number of guide tokens per sample (0 gives all-zero scores).
        query_mask: ``(B, S)`` bool, real tokens; ``False`` rows are neither queries nor scored.
        scale: logit scale, a finite number ``> 0``; default ``1 / sqrt(d)``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        check_indices: check ``guide_count`` and the used ``guide_index`` entries, which reads them back from the
            device (host synchronisations); ``False`` only for guide lists the caller built in range itself.

    Returns:
        ``(B, S)`` float32 score ``a[i]`` of every real token (0 on padding). Values lie in
        ``(0, H * T)``; only vision rows are used by LightKV.
    """
    _check(q, k, guide_index, guide_count, query_mask, check_indices)
    scale = softmax_scale("cross_attention_scores", scale, q.shape[-1])
    if choose_backend(backend, q.device, "cross_attention_scores") == "torch":
        return cross_attention_scores_torch(q, k, guide_index, guide_count, query_mask, scale)
    return cross_attention_scores_triton(q, k, guide_index, guide_count, query_mask, scale)


def cross_attention_scores_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    guide_index: torch.Tensor,
    guide_count: torch.Tensor,
    query_mask: torch.Tensor,
    scale: float,
    configs: tuple[dict[str, int], dict[str, int]] | None = None,
) -> torch.Tensor:
    """Launch both passes with ``configs`` (pass 1, pass 2), by default the tuned or default ones."""
    scale = check_scale("cross_attention_scores_triton", scale)
    batch, heads, seq, head_dim = q.shape
    width = max(1, guide_index.shape[1])
    if configs is None:
        dims = {"S": bucket(seq), "T": bucket(width), "H": heads, "d": head_dim, "dtype": dtype_name(q.dtype)}
        configs = (
            launch_config("scoring.column_lse", q.device, **dims),
            launch_config("scoring.row_sum", q.device, **dims),
        )
    lse_config, sum_config = configs
    guides = torch.zeros(batch, width, dtype=torch.int32, device=q.device)
    guides[:, : guide_index.shape[1]] = guide_index.to(torch.int32)
    counts = guide_count.to(torch.int32).contiguous()
    mask = query_mask.to(torch.int8).contiguous()
    num_splits = triton.cdiv(seq, lse_config["SPLIT_S"])
    head_blocks = triton.cdiv(heads, sum_config["HEADS_PER_PROGRAM"])
    lse = torch.empty(batch, heads, num_splits, width, dtype=torch.float32, device=q.device)
    parts = torch.empty(batch, head_blocks, seq, dtype=torch.float32, device=q.device)
    common = (
        seq,
        heads,
        heads // k.shape[1],
        head_dim,
        width,
        num_splits,
        scale,
        *q.stride(),
        *k.stride(),
    )
    fixed = dict(BLOCK_D=max(16, next_power_of_2(head_dim)), DOT_MODE=dot_mode(q.dtype), enable_fp_fusion=FP_FUSION)
    column_lse_kernel[(batch * heads, triton.cdiv(width, lse_config["BLOCK_T"]), num_splits)](
        q, k, guides, counts, mask, lse, *common, **lse_config, **fixed
    )
    row_sum_kernel[(batch, triton.cdiv(seq, sum_config["BLOCK_S"]), head_blocks)](
        q, k, guides, counts, mask, lse, parts, *common, **sum_config, **fixed
    )
    return parts[:, 0] if head_blocks == 1 else parts.sum(dim=1)


def cross_attention_scores_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    guide_index: torch.Tensor,
    guide_count: torch.Tensor,
    query_mask: torch.Tensor,
    scale: float,
    max_chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """Fallback: the ``(H, S, T)`` logits of a sample at once when they fit in ``max_chunk_elements`` floats,
    else the same two passes as the kernels over chunks of queries (padding rows masked, never gathered)."""
    scale = check_scale("cross_attention_scores_torch", scale)
    batch, heads, seq, _ = q.shape
    group = heads // k.shape[1]
    out = torch.zeros(batch, seq, dtype=torch.float32, device=q.device)
    for b in range(batch):
        count = int(guide_count[b])
        real = query_mask[b]
        if count == 0 or not bool(real.any()):
            continue
        keys = k[b][:, guide_index[b, :count]].float().repeat_interleave(group, dim=0).transpose(1, 2) * scale
        padded = not bool(real.all())

        def logits(start: int, stop: int, keys: torch.Tensor = keys, b: int = b, padded: bool = padded):
            """``(H, stop - start, T)`` scaled logits (``keys`` carry the scale) of queries ``start..stop``,
            ``-inf`` on padding rows."""
            part = torch.matmul(q[b, :, start:stop].float(), keys)
            if padded:
                part.masked_fill_(~query_mask[b, None, start:stop, None], float("-inf"))
            return part

        chunk = max(1, max_chunk_elements // (heads * count))
        if seq <= chunk:
            out[b] = torch.softmax(logits(0, seq), dim=1).sum(dim=(0, 2))
            continue
        lse = torch.full((heads, 1, count), float("-inf"), device=q.device)
        for start in range(0, seq, chunk):
            lse = torch.logaddexp(lse, torch.logsumexp(logits(start, min(seq, start + chunk)), dim=1, keepdim=True))
        for start in range(0, seq, chunk):
            stop = min(seq, start + chunk)
            out[b, start:stop] = logits(start, stop).sub_(lse).exp_().sum(dim=(0, 2))
    return out
