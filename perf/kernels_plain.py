"""Plain PyTorch as released token-merging (ToMe-style) code writes the grouping and the merge: the ``plain``
baseline of :mod:`lightkv_perf.kernels` (see its docstring)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-8


@dataclass
class ImageSets:
    """One image's A and B tokens: ``a_rows (NA,)``/``b_rows (NB,)`` rows of ``x`` and the window of each."""

    a_rows: torch.Tensor
    a_window: torch.Tensor
    b_rows: torch.Tensor
    b_window: torch.Tensor


def image_sets(match_args: tuple[torch.Tensor, ...], window: int) -> list[ImageSets]:
    """Split the stage's window CSR back into images (``window * window`` consecutive windows each)."""
    _, a_rows, a_offsets, b_rows, b_offsets = match_args
    per_image = window * window
    images = []
    for first in range(0, a_offsets.numel() - 1, per_image):
        sets = []
        for rows, offsets in ((a_rows, a_offsets), (b_rows, b_offsets)):
            bounds = offsets[first : first + per_image + 1]
            counts = bounds[1:] - bounds[:-1]
            sets += [
                rows[bounds[0] : bounds[-1]],
                torch.repeat_interleave(torch.arange(per_image, device=rows.device), counts),
            ]
        images.append(ImageSets(*sets))
    return images


def plain_window_match(x: torch.Tensor, images: list[ImageSets]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, a dense cosine-similarity matrix of all its A tokens against all its B tokens, masked to windows.

    Args:
        x: ``(N, D)`` hidden states.
        images: every image's A/B rows and windows, in the order of the stage's CSR.

    Returns:
        ``best (NA,)`` int64 position of the best B token among all images' B tokens concatenated, and ``sim (NA,)``
        float32 its cosine similarity; A tokens in image order.
    """
    best, sim, base = [], [], 0
    for image in images:
        a, b = x[image.a_rows], x[image.b_rows]
        a = a / a.norm(dim=-1, keepdim=True)
        b = b / b.norm(dim=-1, keepdim=True)
        scores = a @ b.T
        scores.masked_fill_(image.a_window[:, None] != image.b_window[None, :], float("-inf"))
        values, index = scores.max(dim=-1)
        best.append(index + base)
        sim.append(values.float())
        base += image.b_rows.numel()
    return torch.cat(best), torch.cat(sim)


def plain_merge(
    x: torch.Tensor, weights: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """Weighted merge over the full sequence, then a boolean-mask gather of the kept rows.

    Args:
        x: ``(N, D)`` rows.
        weights: ``(N,)`` float32 merge weights.
        sources: ``(R,)`` int64 rows that merge away; ``targets``: ``(R,)`` the row each merges into.
        keep: ``(N,)`` bool rows that survive.

    Returns:
        ``(keep.sum(), D)`` in ``x``'s dtype: receiving rows averaged with their sources, the others unchanged.
    """
    acc = x.float() * weights[:, None]
    acc.index_add_(0, targets, acc[sources])
    total = weights.index_add(0, targets, weights[sources])
    merged = (acc / total.clamp(min=EPS)[:, None]).to(x.dtype)
    receives = torch.zeros_like(keep).index_fill_(0, targets, True)
    return torch.where(receives[:, None], merged, x)[keep]


def plain_merge_args(merge_args: tuple[torch.Tensor, ...], merged_into: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(x, weights, sources, targets, keep)`` for :func:`plain_merge`, from the stage's merge arguments and its
    ``merged_into`` ``(N,)``."""
    x, weights = merge_args[:2]
    sources = (merged_into >= 0).nonzero().squeeze(1)
    return x, weights, sources, merged_into[sources], merged_into < 0
