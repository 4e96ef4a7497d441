"""Attention each key receives: the statistic FastV, PrefixKV, AirCache and LOOK-M rank tokens by."""

from __future__ import annotations

import torch

from lightkv_core.kernels import attention_statistics
from lightkv_core.kernels.launch import FLOAT_DTYPES


def rows_where(mask: torch.Tensor) -> torch.Tensor:
    """``(B, S)`` int64: the index of every ``True`` position of ``mask`` ``(B, S)``, ``-1`` elsewhere (a query
    or key index for :func:`~lightkv_core.kernels.attention_statistics`)."""
    index = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask.to(torch.bool), index, -1)


def all_columns(batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """``(B, S)`` int64 key index covering every position."""
    return torch.arange(seq, device=device).expand(batch, seq)


def received_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    queries: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    last_token_only: bool = False,
    heads: str = "mean",
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Post-softmax causal attention each key receives, summed over queries (FastV averages it:
    :func:`~lightkv_core.methods.fastv.mean_received_attention`); streams through
    :func:`~lightkv_core.kernels.attention_statistics` (never ``S x S``).

    Args:
        q: ``(B, H, S, d)``; k: ``(B, Hk, S, d)`` with ``H % Hk == 0`` (cast to float32 if their dtypes differ
            or are not a kernel dtype).
        attention_mask: ``(B, S)`` bool, real tokens (padding takes no part).
        queries: ``(B, S)`` bool, the query rows summed over; default every real row.
        key_mask: ``(B, S)`` bool, the keys each row's softmax runs over; default every real key.
        last_token_only: sum over the last real row only (instead of ``queries``).
        heads: ``"mean"`` (``(B, S)``, averaged over query heads) or ``"per_head"`` (``(B, H, S)``).
        scale, backend: as for the kernel.

    Returns:
        float32 attention received by every key position (0 where no query can see it).
    """
    if q.dtype != k.dtype or q.dtype not in FLOAT_DTYPES:
        q, k = q.float(), k.float()
    real = attention_mask.to(q.device, torch.bool)
    query_index = rows_where(real if queries is None else queries.to(q.device))
    if last_token_only:
        query_index = rows_where(real).amax(dim=1, keepdim=True)  # the last real row (-1: none)
    return attention_statistics(
        q,
        k,
        query_index,
        all_columns(*real.shape, q.device),
        key_mask=real if key_mask is None else key_mask.to(q.device),
        causal=True,
        scale=scale,
        heads=heads,
        backend=backend,
        check_indices=False,  # rows_where and all_columns build in-range lists
    )
