"""Prompt-weighted merge and compaction in one pass (README, "Semantics" and "Kernels").

Every output row ``m`` names the input row ``out_rows[m]`` that lands there (``-1``: a padding row,
written as zeros) and, in CSR form, the rows merged into it, ``src_rows[src_offsets[m]:src_offsets[m+1]]``.
A row with no sources is copied bit for bit; a row ``b`` with sources ``M(b)`` becomes::

    x'_b = (w_b x_b + sum_{a in M(b)} w_a x_a) / max(w_b + sum_{a in M(b)} w_a, 1e-8)

accumulated in float32 and cast back to ``x``'s dtype. The Triton kernel runs one program per (output
row, block of ``BLOCK_D`` features; tile sizes from :mod:`lightkv_core.kernels.tuning`); the fallback holds
float32 copies of the merged rows only.
"""

from __future__ import annotations

import torch

from lightkv_core.kernels.launch import (
    FP_FUSION,
    TRITON_AVAILABLE,
    check_csr,
    check_float,
    check_index,
    check_index_lists,
    check_rows,
    check_same_device,
    choose_backend,
)
from lightkv_core.kernels.tuning import dtype_name, launch_config

EPS = 1e-8

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def merge_compact_kernel(
        x_ptr,
        w_ptr,
        out_rows_ptr,
        src_offsets_ptr,
        src_rows_ptr,
        out_ptr,
        D,
        sxn,
        sxd,
        son,
        sod,
        BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # 64-bit offsets: row * son passes 2**31 on long outputs
        d_offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_valid = d_offs < D
        target = tl.load(out_rows_ptr + row)
        real = (tl.zeros([BLOCK_D], tl.int64) + target) >= 0
        x_target = tl.load(x_ptr + target * sxn + d_offs * sxd, mask=d_valid & real, other=0.0)
        src_begin = tl.load(src_offsets_ptr + row)
        src_end = tl.load(src_offsets_ptr + row + 1)
        # only rows with sources read a weight; those are never padding (checked by the wrapper)
        weight = tl.load(w_ptr + tl.maximum(target, 0), mask=src_end > src_begin, other=0.0)
        acc = weight * x_target.to(tl.float32)
        total = weight
        for j in range(src_begin, src_end):
            src = tl.load(src_rows_ptr + j)
            w_src = tl.load(w_ptr + src)
            acc += w_src * tl.load(x_ptr + src * sxn + d_offs * sxd, mask=d_valid, other=0.0).to(tl.float32)
            total += w_src
        merged = (acc / tl.maximum(total, 1e-8)).to(x_target.dtype)
        result = tl.where(src_end > src_begin, merged, x_target)
        tl.store(out_ptr + row * son + d_offs * sod, result, mask=d_valid)


def _check(
    x: torch.Tensor, weights: torch.Tensor, out_rows: torch.Tensor, src_offsets: torch.Tensor, src_rows: torch.Tensor
) -> None:
    op = "merge_compact"
    check_float(op, "x", x)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be (N, D), got shape {tuple(x.shape)}")
    if not isinstance(weights, torch.Tensor) or weights.dtype != torch.float32 or tuple(weights.shape) != (x.shape[0],):
        raise TypeError(f"{op}: weights must be a float32 tensor of shape ({x.shape[0]},)")
    for name, tensor in (("out_rows", out_rows), ("src_offsets", src_offsets), ("src_rows", src_rows)):
        check_index(op, name, tensor, 1)
    check_same_device(op, x=x, weights=weights)
    check_index_lists(op, x, out_rows=out_rows, src_offsets=src_offsets, src_rows=src_rows)
    if src_offsets.numel() != out_rows.numel() + 1:
        raise ValueError(f"{op}: src_offsets needs len(out_rows) + 1 = {out_rows.numel() + 1} entries")
    check_csr(op, "src_offsets", src_offsets, src_rows.numel())
    check_rows(op, "out_rows", out_rows, x.shape[0], lowest=-1)
    check_rows(op, "src_rows", src_rows, x.shape[0])
    padding_sources = (src_offsets[1:] > src_offsets[:-1]) & (out_rows < 0)
    if bool(padding_sources.any()):
        raise ValueError(f"{op}: a padding row (out_rows == -1) cannot receive merged rows")


def merge_compact(
    x: torch.Tensor,
    weights: torch.Tensor,
    out_rows: torch.Tensor,
    src_offsets: torch.Tensor,
    src_rows: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Merge groups of rows with weighted averages and gather the result into a new sequence.

    Args:
        x: ``(N, D)`` rows (fp16/bf16/fp32), e.g. ``hidden.view(B * S, D)``.
        weights: ``(N,)`` float32 merge weight of every row (the cross-attention scores).
        out_rows: ``(M,)`` int, the row of ``x`` written to each output row, ``-1`` for padding. The index lists
            may live on the host (checked there without waiting for the device, then copied over).
        src_offsets: ``(M + 1,)`` CSR pointers into ``src_rows``.
        src_rows: rows of ``x`` merged into each output row.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``(M, D)`` tensor in ``x``'s dtype.
    """
    _check(x, weights, out_rows, src_offsets, src_rows)
    out_rows, src_offsets, src_rows = (t.to(x.device) for t in (out_rows, src_offsets, src_rows))
    if choose_backend(backend, x.device, "merge_compact") == "torch":
        return merge_compact_torch(x, weights, out_rows, src_offsets, src_rows)
    return merge_compact_triton(x, weights, out_rows, src_offsets, src_rows)


def merge_compact_triton(
    x: torch.Tensor,
    weights: torch.Tensor,
    out_rows: torch.Tensor,
    src_offsets: torch.Tensor,
    src_rows: torch.Tensor,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Launch with ``config``, by default the tuned or default one (index lists copied to ``x``'s device)."""
    out = torch.empty(out_rows.numel(), x.shape[1], dtype=x.dtype, device=x.device)
    if out_rows.numel() == 0:
        return out
    if config is None:
        config = launch_config("merge_compact", x.device, D=x.shape[1], dtype=dtype_name(x.dtype))
    merge_compact_kernel[(out_rows.numel(), triton.cdiv(x.shape[1], config["BLOCK_D"]))](
        x,
        weights.contiguous(),
        out_rows.to(x.device, torch.long).contiguous(),
        src_offsets.to(x.device, torch.long).contiguous(),
        src_rows.to(x.device, torch.long).contiguous(),
        out,
        x.shape[1],
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        **config,
        enable_fp_fusion=FP_FUSION,
    )
    return out


def merge_compact_torch(
    x: torch.Tensor, weights: torch.Tensor, out_rows: torch.Tensor, src_offsets: torch.Tensor, src_rows: torch.Tensor
) -> torch.Tensor:
    """Fallback: gather, then index_add the weighted sources of the receiving rows in float32. A pure gather
    (no sources: what the dropping methods ask) reads nothing back from the device."""
    out_rows = out_rows.long()
    real = out_rows >= 0
    if x.shape[0] == 0:  # every output row is padding
        return torch.zeros(out_rows.numel(), x.shape[1], dtype=x.dtype, device=x.device)
    out = x.index_select(0, out_rows.clamp(min=0)).masked_fill_(~real[:, None], 0)
    if src_rows.numel() == 0:
        return out
    counts = src_offsets[1:] - src_offsets[:-1]
    receivers = (counts > 0).nonzero().squeeze(1)
    if receivers.numel() == 0:
        return out
    targets = out_rows[receivers]
    acc = weights[targets, None] * x[targets].float()
    total = weights[targets].clone()
    slot = torch.repeat_interleave(torch.arange(receivers.numel(), device=x.device), counts[receivers])
    sources = src_rows.long()
    acc.index_add_(0, slot, weights[sources, None] * x[sources].float())
    total.index_add_(0, slot, weights[sources])
    out[receivers] = (acc / total.clamp(min=EPS)[:, None]).to(x.dtype)
    return out
