"""Packed SGLang prefill batches as the methods see them (left-padded ``(B, S, ...)`` rows and their spans), and
the input-logprob starts of a shortened one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch


def left_mask(lengths: Sequence[int], width: int, device: torch.device) -> torch.Tensor:
    """``(B, width)`` bool: the real tokens of left-padded rows."""
    columns = torch.arange(width, device=device)
    return columns[None, :] >= (width - torch.tensor(lengths, device=device))[:, None]


def pad_left(packed: torch.Tensor, mask: torch.Tensor, fill: float = 0) -> torch.Tensor:
    """``(N, ...)`` packed rows as ``(B, S, ...)`` left-padded with ``fill``."""
    out = packed.new_full((*mask.shape, *packed.shape[1:]), fill)
    out[mask] = packed
    return out


def pad_positions(positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(N,)`` / ``(3, N)`` packed position ids as ``(B, S)`` / ``(3, B, S)`` left-padded with zeros."""
    if positions.ndim == 1:
        return pad_left(positions, mask)
    return torch.stack([pad_left(row, mask) for row in positions])


def shift_spans(spans: Sequence, offset: int) -> list:
    """``spans`` moved by ``offset`` tokens."""
    return [replace(span, start=span.start + offset, end=span.end + offset) for span in spans]


def logprob_starts(forward_batch: object, lengths: list[int]) -> list[int]:
    """Where each request's input logprobs start in a layer group's view of an extend batch (``lengths``: each
    request's tokens there): unchanged for a request the reduction left whole; for a shortened one its new length,
    i.e. none (a compressed prompt never asks for input logprobs: the layer groups refuse it), so the tokens whose
    logprobs SGLang computes stay those it asked for."""
    starts = forward_batch.extend_logprob_start_lens_cpu or forward_batch.extend_seq_lens_cpu
    return [
        start if new == old else new
        for start, old, new in zip(starts, forward_batch.extend_seq_lens_cpu, lengths, strict=True)
    ]
