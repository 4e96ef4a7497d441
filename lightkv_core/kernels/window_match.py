"""Per-window bipartite matching (README, "Semantics" and "Kernels"): for every A token, its most similar B token.

Windows are given in CSR form over the flattened rows of ``x`` (all samples, all images, one launch). Similarity is
cosine in float32, ``x_a . x_b / (|x_a| |x_b| + 1e-8)``; ``best[a]`` is the position in ``b_rows`` of the best B
token (ties: lowest position) and ``sim[a]`` its cosine. How the tie rule survives tiling: README, "Kernels", the
comment on the Triton kernel and :func:`window_best_match_torch`.
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
    choose_backend,
)
from lightkv_core.kernels.tuning import bucket, dtype_name, launch_config

EPS = 1e-8

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    # One program per (window, tile of A tokens); the window's B tokens stream in tiles. Exact copies of a B vector
    # must tie wherever they sit (either side of a tile boundary, any offset of the window in the batch), so a
    # similarity depends on the two vectors alone, never on their positions: the dot products are elementwise
    # float32 products summed over BLOCK_D slices (tl.sum reduces every (a, b) pair with the same tree), the slices
    # added in order. tl.dot may round a column differently by its place in the tile (BLAS under the interpreter
    # does), and then a copy after a tile boundary could beat the same vector before it. The products are few beside
    # a prefill's (LLaVA-NeXT's first stage, 2,880 vision tokens in 16 windows at D = 4,096: about 1 GFLOP, against
    # about 40 TFLOP for a 7B model's prefill of that prompt), so tensor cores would not pay here.
    @triton.jit
    def window_match_kernel(
        x_ptr,
        a_rows_ptr,
        a_offsets_ptr,
        b_rows_ptr,
        b_offsets_ptr,
        tile_window_ptr,
        tile_start_ptr,
        best_ptr,
        sim_ptr,
        D,
        sxn,
        sxd,
        BLOCK_A: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        tile = tl.program_id(0)
        window = tl.load(tile_window_ptr + tile)
        a_pos = tl.load(tile_start_ptr + tile) + tl.arange(0, BLOCK_A)
        a_valid = a_pos < tl.load(a_offsets_ptr + window + 1)
        a_rows = tl.load(a_rows_ptr + a_pos, mask=a_valid, other=0)
        b_begin = tl.load(b_offsets_ptr + window)
        b_end = tl.load(b_offsets_ptr + window + 1)
        best_sim = tl.full([BLOCK_A], float("-inf"), tl.float32)
        best_pos = tl.full([BLOCK_A], -1, tl.int64)
        for b_start in range(b_begin, b_end, BLOCK_B):
            b_pos = b_start + tl.arange(0, BLOCK_B)
            b_valid = b_pos < b_end
            b_rows = tl.load(b_rows_ptr + b_pos, mask=b_valid, other=0)
            dots = tl.zeros([BLOCK_A, BLOCK_B], tl.float32)
            a_sq = tl.zeros([BLOCK_A], tl.float32)
            b_sq = tl.zeros([BLOCK_B], tl.float32)
            for d_start in range(0, D, BLOCK_D):
                d_offs = d_start + tl.arange(0, BLOCK_D)
                d_valid = d_offs < D
                xa = tl.load(
                    x_ptr + a_rows[:, None] * sxn + d_offs[None, :] * sxd,
                    mask=a_valid[:, None] & d_valid[None, :],
                    other=0.0,
                ).to(tl.float32)
                xb = tl.load(
                    x_ptr + b_rows[None, :] * sxn + d_offs[:, None] * sxd,
                    mask=d_valid[:, None] & b_valid[None, :],
                    other=0.0,
                ).to(tl.float32)
                dots += tl.sum(xa[:, :, None] * xb[None, :, :], axis=1)
                a_sq += tl.sum(xa * xa, axis=1)
                b_sq += tl.sum(xb * xb, axis=0)
            sims = dots / (tl.sqrt(a_sq)[:, None] * tl.sqrt(b_sq)[None, :] + 1e-8)
            sims = tl.where(b_valid[None, :], sims, float("-inf"))
            tile_best, tile_arg = tl.max(sims, axis=1, return_indices=True, return_indices_tie_break_left=True)
            better = tile_best > best_sim
            best_pos = tl.where(better, b_start + tile_arg.to(tl.int64), best_pos)
            best_sim = tl.where(better, tile_best, best_sim)
        tl.store(best_ptr + a_pos, best_pos, mask=a_valid)
        tl.store(sim_ptr + a_pos, best_sim, mask=a_valid)


def _check(
    x: torch.Tensor, a_rows: torch.Tensor, a_offsets: torch.Tensor, b_rows: torch.Tensor, b_offsets: torch.Tensor
) -> None:
    op = "window_best_match"
    check_float(op, "x", x)
    if x.dim() != 2 or x.shape[1] < 1:
        raise ValueError(f"{op}: x must be (N, D) with D >= 1 (a cosine needs a feature), got shape {tuple(x.shape)}")
    for name, tensor in (("a_rows", a_rows), ("a_offsets", a_offsets), ("b_rows", b_rows), ("b_offsets", b_offsets)):
        check_index(op, name, tensor, 1)
    check_index_lists(op, x, a_rows=a_rows, a_offsets=a_offsets, b_rows=b_rows, b_offsets=b_offsets)
    if a_offsets.numel() != b_offsets.numel() or a_offsets.numel() < 1:
        raise ValueError(f"{op}: a_offsets and b_offsets must both have (windows + 1) entries")
    for name, offsets, rows in (("a", a_offsets, a_rows), ("b", b_offsets, b_rows)):
        check_csr(op, f"{name}_offsets", offsets, rows.numel())
        check_rows(op, f"{name}_rows", rows, x.shape[0])


def window_best_match(
    x: torch.Tensor,
    a_rows: torch.Tensor,
    a_offsets: torch.Tensor,
    b_rows: torch.Tensor,
    b_offsets: torch.Tensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best B token of every A token inside its window.

    Args:
        x: ``(N, D)`` hidden states (fp16/bf16/fp32), e.g. ``hidden.view(B * S, D)``.
        a_rows: ``(NA,)`` rows of ``x`` that are A tokens, grouped by window. The index lists may live on the host
            (then the Triton launch plans its tiles there without waiting for the device, and copies them over).
        a_offsets: ``(NW + 1,)`` CSR pointers of the A tokens of each window.
        b_rows: ``(NB,)`` rows of ``x`` that are B tokens, grouped by window.
        b_offsets: ``(NW + 1,)`` CSR pointers of the B tokens of each window.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``best`` ``(NA,)`` int64: position in ``b_rows`` of the most similar B token of the same window
        (ties: lowest position; ``-1`` if the window has no B token), and ``sim`` ``(NA,)`` float32: that
        cosine similarity (``-inf`` if none).
    """
    _check(x, a_rows, a_offsets, b_rows, b_offsets)
    if choose_backend(backend, x.device, "window_best_match") == "torch":
        return window_best_match_torch(x, a_rows, a_offsets, b_rows, b_offsets)
    return window_best_match_triton(x, a_rows, a_offsets, b_rows, b_offsets)


def window_best_match_triton(
    x: torch.Tensor,
    a_rows: torch.Tensor,
    a_offsets: torch.Tensor,
    b_rows: torch.Tensor,
    b_offsets: torch.Tensor,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch with ``config``, by default the tuned or default one for the largest window. The tiles are planned
    where the offsets live (on the host, no wait for the device) and copied to ``x``'s device."""
    num_a = a_rows.numel()
    device = x.device
    best = torch.empty(num_a, dtype=torch.long, device=device)
    sim = torch.empty(num_a, dtype=torch.float32, device=device)
    if num_a == 0:
        return best, sim
    a_offsets = a_offsets.long()
    counts = a_offsets[1:] - a_offsets[:-1]
    if config is None:
        largest = int((b_offsets[1:] - b_offsets[:-1]).max())
        config = launch_config(
            "window_match", x.device, window=bucket(largest), D=x.shape[1], dtype=dtype_name(x.dtype)
        )
    block_a = config["BLOCK_A"]
    tiles_per_window = (counts + block_a - 1) // block_a
    tile_window = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), tiles_per_window)
    first_tile = torch.cumsum(tiles_per_window, 0) - tiles_per_window
    tile_rank = torch.arange(tile_window.numel(), device=counts.device) - first_tile[tile_window]
    tile_start = a_offsets[:-1][tile_window] + tile_rank * block_a
    window_match_kernel[(tile_window.numel(),)](
        x,
        a_rows.to(device, torch.long).contiguous(),
        a_offsets.to(device).contiguous(),
        b_rows.to(device, torch.long).contiguous(),
        b_offsets.to(device, torch.long).contiguous(),
        tile_window.to(device),
        tile_start.to(device),
        best,
        sim,
        x.shape[1],
        x.stride(0),
        x.stride(1),
        **config,
        enable_fp_fusion=FP_FUSION,
    )
    return best, sim


def window_best_match_torch(
    x: torch.Tensor,
    a_rows: torch.Tensor,
    a_offsets: torch.Tensor,
    b_rows: torch.Tensor,
    b_offsets: torch.Tensor,
    max_chunk_elements: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fallback: one float64 matmul per window (chunked over A tokens), rounded to float32; the best B token
    then moves to the lowest copy of its vector (:func:`_lowest_copies`)."""
    best = torch.full((a_rows.numel(),), -1, dtype=torch.long, device=x.device)
    sim = torch.full((a_rows.numel(),), float("-inf"), dtype=torch.float32, device=x.device)
    a_bounds = a_offsets.tolist()
    b_bounds = b_offsets.tolist()
    for window in range(len(a_bounds) - 1):
        a0, a1, b0, b1 = a_bounds[window], a_bounds[window + 1], b_bounds[window], b_bounds[window + 1]
        if a0 == a1 or b0 == b1:
            continue
        xb_given = x[b_rows[b0:b1]]
        xb = xb_given.double()
        b_norm = xb.norm(dim=1)
        chunk = max(1, max_chunk_elements // (b1 - b0))
        for start in range(a0, a1, chunk):
            stop = min(a1, start + chunk)
            xa = x[a_rows[start:stop]].double()
            sims = ((xa @ xb.T) / (xa.norm(dim=1)[:, None] * b_norm[None, :] + EPS)).float()
            values, index = sims.max(dim=1)
            best[start:stop] = _lowest_copies(sims, values, index, xb_given) + b0
            sim[start:stop] = values
    return best, sim


#: How far below the maximum a cosine may lie and still be a copy of the best vector rounded elsewhere
#: (a few float32 ulps at 1.0); such columns are only compared for equality, never chosen for their value.
COPY_SLACK = 1e-6


def _lowest_copies(sims: torch.Tensor, values: torch.Tensor, index: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    """``index`` ``(A,)`` (argmax of ``sims`` ``(A, B)``, maxima ``values``) moved to the lowest column whose
    B vector (row of ``xb``) equals the chosen one. A matmul may round a column differently by its position, so
    an exact copy of the best vector can come out an ulp below it; the tie rule wants the lowest copy."""
    rows, columns = torch.nonzero(sims >= values[:, None] - COPY_SLACK, as_tuple=True)
    if rows.numel() == index.numel():  # no row has a candidate besides its maximum
        return index
    same = (xb[columns] == xb[index[rows]]).all(dim=1)
    return index.scatter_reduce(0, rows[same], columns[same], "amin")
