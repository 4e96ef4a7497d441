"""The one "kernel equals fallback" rule (lightkv_core.kernels.agreement): what it lets through and what not."""

from __future__ import annotations

import math

import pytest
import torch

from lightkv_core.kernels import agreement, cross_attention_scores, merge_compact, window_best_match
from lightkv_core.kernels.merge_compact import merge_compact_torch
from lightkv_core.kernels.scoring import cross_attention_scores_torch


def test_tolerance_is_the_probabilistic_bound_plus_one_output_rounding():
    u = torch.finfo(torch.float32).eps / 2
    assert agreement.rounding_tolerance(torch.float32, 100, 2.0) == pytest.approx(2 * 8 * 10 * u * 2.0)
    f16 = agreement.kernel_tolerance(torch.float16, 100, 2.0)
    f32 = agreement.rounding_tolerance(torch.float32, 100, 2.0)
    assert f16 == pytest.approx(f32 + torch.finfo(torch.float16).eps * 2)
    assert agreement.kernel_tolerance(torch.float16, 100, 2.0, roundings=3) > f16
    assert agreement.kernel_tolerance(torch.float32, 100, 2.0) == agreement.rounding_tolerance(torch.float32, 100, 2.0)


def test_check_close_passes_rounding_and_names_a_real_difference():
    expected = torch.linspace(-3, 3, 50)
    tolerance = agreement.kernel_tolerance(torch.float32, 64, 3.0)
    assert agreement.check_close("op", expected + tolerance / 2, expected, 64) <= tolerance
    with pytest.raises(agreement.KernelMismatch, match="op: differs from the fallback"):
        agreement.check_close("op", expected + 2 * tolerance, expected, 64)
    with pytest.raises(agreement.KernelMismatch, match="instead of"):
        agreement.check_close("op", expected[1:], expected, 64)


def test_logit_bound_is_cauchy_schwarz():
    q, k = torch.full((2, 3, 4), 0.5), torch.full((2, 5, 4), 2.0)
    assert agreement.logit_bound(q, k, 0.5) == pytest.approx(1.0 * 4.0 * 0.5)
    assert agreement.logit_bound(q * 0.01, k, 0.5) == 1.0  # at least 1


def test_every_kernel_agrees_with_its_fallback(backend, device):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 96, 16, generator=generator).to(device)
    k = torch.randn(1, 2, 96, 16, generator=generator).to(device)
    guide_index, guide_count = torch.arange(80, 96, device=device)[None], torch.tensor([16], device=device)
    mask = torch.ones(1, 96, dtype=torch.bool, device=device)
    scale = 16**-0.5
    scores = cross_attention_scores(q, k, guide_index, guide_count, mask, scale, backend=backend)
    expected = cross_attention_scores_torch(q, k, guide_index, guide_count, mask, scale)
    agreement.check_scores(scores, expected, q, k, scale, 16)
    with pytest.raises(agreement.KernelMismatch):
        agreement.check_scores(scores * 1.01, expected, q, k, scale, 16)

    x = torch.randn(40, 32, generator=generator).to(device)
    a_rows, b_rows = torch.arange(0, 40, 2, device=device), torch.arange(1, 40, 2, device=device)
    offsets = torch.tensor([0, 10, 20], device=device)
    match_args = (x, a_rows, offsets, b_rows, offsets)
    fallback = window_best_match(*match_args, backend="torch")
    assert agreement.check_window_match(match_args, window_best_match(*match_args, backend=backend), fallback) == 0

    weights = torch.rand(40, generator=generator).to(device)
    out_rows = torch.arange(0, 40, 2, device=device)
    src_offsets = torch.arange(21, device=device)
    src_rows = torch.arange(1, 40, 2, device=device)
    merged = merge_compact(x, weights, out_rows, src_offsets, src_rows, backend=backend)
    expected_merge = merge_compact_torch(x, weights, out_rows, src_offsets, src_rows)
    assert agreement.check_merge(merged, expected_merge, src_offsets) <= agreement.kernel_tolerance(
        torch.float32, 5, float(expected_merge.abs().max())
    )
    assert math.isfinite(agreement.check_merge(expected_merge, expected_merge, src_offsets))
