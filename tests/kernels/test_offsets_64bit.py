"""Pointer offsets past 2**31 elements: a batch whose per-sample stride fits a 32-bit argument but whose later
samples start beyond 2**31 elements (LLaVA-NeXT's q at S = 2,980 from batch 177; here with three samples on a
sparse, mostly untouched storage). The Triton kernels compute ``b * stride`` in 64 bits, so every sample reads its
own rows and agrees with the fallback; in 32 bits the third sample's offset would wrap."""

from __future__ import annotations

import pytest
import torch
from helpers.backends import triton_skip_reason

from lightkv_core.kernels import agreement, attention_statistics, cross_attention_scores
from lightkv_core.kernels.attention_stats import attention_statistics_torch
from lightkv_core.kernels.scoring import cross_attention_scores_torch

#: Elements between two samples: below 2**31 (a 32-bit stride argument), while sample 2 starts past 2**31.
BATCH_STRIDE = 2**30 + 2**12
BATCH, HEADS, SEQ, DIM = 3, 2, 40, 16

pytestmark = pytest.mark.skipif(triton_skip_reason() is not None, reason=str(triton_skip_reason()))


def far_apart(generator: torch.Generator, device: str) -> torch.Tensor:
    """``(BATCH, HEADS, SEQ, DIM)`` float16 samples ``BATCH_STRIDE`` elements apart; only their rows are touched."""
    storage = torch.empty(BATCH_STRIDE * (BATCH - 1) + HEADS * SEQ * DIM, dtype=torch.float16, device=device)
    view = storage.as_strided((BATCH, HEADS, SEQ, DIM), (BATCH_STRIDE, SEQ * DIM, DIM, 1))
    for b in range(BATCH):
        view[b] = torch.randn(HEADS, SEQ, DIM, generator=generator).to(device, torch.float16)
    assert view.stride(0) < 2**31 <= (BATCH - 1) * view.stride(0)
    return view


def test_scores_of_samples_past_two_to_the_31(device):
    generator = torch.Generator().manual_seed(0)
    q, k = far_apart(generator, device), far_apart(generator, device)
    guide_index = torch.arange(SEQ - 8, SEQ, device=device).expand(BATCH, -1)
    guide_count = torch.full((BATCH,), 8, device=device)
    mask = torch.ones(BATCH, SEQ, dtype=torch.bool, device=device)
    scale = DIM**-0.5
    got = cross_attention_scores(q, k, guide_index, guide_count, mask, scale, backend="triton")
    expected = cross_attention_scores_torch(q, k, guide_index, guide_count, mask, scale)
    agreement.check_scores(got, expected, q, k, scale, 8)


def test_attention_statistics_of_samples_past_two_to_the_31(device):
    generator = torch.Generator().manual_seed(1)
    q, k = far_apart(generator, device), far_apart(generator, device)
    query_index = torch.arange(SEQ - 6, SEQ, device=device).expand(BATCH, -1).contiguous()
    key_index = torch.arange(SEQ, device=device).expand(BATCH, -1).contiguous()
    mask = torch.ones(BATCH, SEQ, dtype=torch.bool, device=device)
    scale = DIM**-0.5
    got = attention_statistics(q, k, query_index, key_index, key_mask=mask, scale=scale, backend="triton")
    expected = attention_statistics_torch(q, k, query_index, key_index, mask, True, scale)
    agreement.check_attention_statistics(got, expected, q, k, scale, 6)
