"""The launch options and checks every kernel shares (``lightkv_core.kernels.launch``): each Triton launch states
its FP-fusion choice (``launch.FP_FUSION``) instead of relying on Triton's default, which Triton 3.9 warns flips in
3.10; every softmax scale is a finite number > 0 and ``q`` has heads of size >= 1, on either backend."""

from __future__ import annotations

import importlib
import re

import pytest
import torch
from helpers.backends import triton_skip_reason

from lightkv_core.kernels import attention_stats, launch, scoring, window_match

# the package exports the function merge_compact under the module's name
merge_module = importlib.import_module("lightkv_core.kernels.merge_compact")

KERNELS = (
    (scoring, "column_lse_kernel"),
    (scoring, "row_sum_kernel"),
    (attention_stats, "row_lse_kernel"),
    (attention_stats, "column_sum_kernel"),
    (merge_module, "merge_compact_kernel"),
    (window_match, "window_match_kernel"),
)


class LaunchSpy:
    """Stands in for a JIT kernel: records the keyword options of each launch, then launches the real one."""

    def __init__(self, kernel: object, launches: list[dict]) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid: tuple):
        def launch_with(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch_with


@pytest.mark.skipif(triton_skip_reason() is not None, reason=str(triton_skip_reason()))
def test_every_launch_states_fp_fusion(monkeypatch, device):
    launches: dict[str, list[dict]] = {}
    for module, name in KERNELS:
        launches[name] = []
        monkeypatch.setattr(module, name, LaunchSpy(getattr(module, name), launches[name]))
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 24, 16, generator=generator).to(device)
    mask = torch.ones(1, 24, dtype=torch.bool, device=device)
    index = torch.arange(24, device=device)[None]
    scoring.cross_attention_scores(q, q, index[:, 16:], torch.tensor([8], device=device), mask, backend="triton")
    attention_stats.attention_statistics(q, q, index[:, 20:], index, key_mask=mask, backend="triton")
    x = torch.randn(24, 32, generator=generator).to(device)
    rows = torch.arange(24, device=device)
    offsets = torch.tensor([0, 12], device=device)
    window_match.window_best_match(x, rows[0::2], offsets, rows[1::2], offsets, backend="triton")
    weights = torch.ones(24, device=device)
    merge_module.merge_compact(x, weights, rows[0::2], torch.arange(13, device=device), rows[1::2], backend="triton")
    for name, recorded in launches.items():
        assert recorded, f"{name} was not launched"
        assert all(kwargs.get("enable_fp_fusion") is launch.FP_FUSION for kwargs in recorded), name


# ----------------------------------------------------------------------------------------------
# the shared checks: softmax scale, attention shapes


def attention_inputs(heads: int = 2, kv_heads: int = 2, head_dim: int = 8, seq: int = 12) -> dict:
    generator = torch.Generator().manual_seed(0)
    return dict(
        q=torch.randn(1, heads, seq, head_dim, generator=generator),
        k=torch.randn(1, kv_heads, seq, head_dim, generator=generator),
        index=torch.arange(seq)[None],
        mask=torch.ones(1, seq, dtype=torch.bool),
    )


def score(inputs: dict, backend: str, scale: object = None) -> torch.Tensor:
    guide = inputs["index"][:, -4:]
    return scoring.cross_attention_scores(
        inputs["q"], inputs["k"], guide, torch.tensor([4]), inputs["mask"], scale, backend=backend
    )


def statistics(inputs: dict, backend: str, scale: object = None) -> torch.Tensor:
    index = inputs["index"]
    return attention_stats.attention_statistics(
        inputs["q"], inputs["k"], index[:, -4:], index, scale=scale, backend=backend
    )


KERNEL_CALLS = {"cross_attention_scores": score, "attention_statistics": statistics}
BAD_SCALES = [-1.0, -0.125, 0, 0.0, float("nan"), float("inf"), float("-inf")]


@pytest.mark.parametrize("op", sorted(KERNEL_CALLS))
@pytest.mark.parametrize("scale", BAD_SCALES, ids=repr)
def test_kernels_refuse_a_non_positive_or_non_finite_scale(op, scale, backend):
    """A negative scale reverses the attention, 0 makes it uniform, NaN/Inf poison it: none is a softmax scale (a
    positive one, e.g. its magnitude, still runs)."""
    inputs = attention_inputs()
    with pytest.raises(ValueError, match=re.escape(f"{op}: scale must be a finite number > 0, got {scale!r}")):
        KERNEL_CALLS[op](inputs, backend, scale)
    assert KERNEL_CALLS[op](inputs, backend, 0.3).shape[-1] == 12


@pytest.mark.parametrize("op", sorted(KERNEL_CALLS))
@pytest.mark.parametrize("scale", [True, "0.5", torch.tensor(0.5)], ids=["bool", "str", "tensor"])
def test_kernels_refuse_a_scale_that_is_not_a_number(op, scale):
    with pytest.raises(TypeError, match=f"{op}: scale must be a real number"):
        KERNEL_CALLS[op](attention_inputs(), "torch", scale)


def test_the_fallbacks_and_launchers_check_their_scale_too():
    inputs = attention_inputs()
    q, k, index, mask = inputs["q"], inputs["k"], inputs["index"], inputs["mask"]
    guide, count = index[:, -4:], torch.tensor([4])
    calls = {
        "cross_attention_scores_torch": lambda s: scoring.cross_attention_scores_torch(q, k, guide, count, mask, s),
        "cross_attention_scores_triton": lambda s: scoring.cross_attention_scores_triton(q, k, guide, count, mask, s),
        "attention_statistics_torch": lambda s: attention_stats.attention_statistics_torch(
            q, k, guide, index, mask, True, s
        ),
        "attention_statistics_triton": lambda s: attention_stats.attention_statistics_triton(
            q, k, guide, index, mask, True, s
        ),
    }
    for op, call in calls.items():
        assert call(8**-0.5).shape[-1] in (4, 12)
        for scale in (-1.0, 0.0, float("nan")):
            with pytest.raises(ValueError, match=f"{op}: scale must be a finite number > 0"):
                call(scale)


@pytest.mark.parametrize("op", sorted(KERNEL_CALLS))
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim", [(0, 2, 8), (0, 1, 8), (2, 2, 0)], ids=["no-heads", "no-heads-gqa", "head-dim-0"]
)
def test_kernels_refuse_q_without_heads_or_head_size(op, heads, kv_heads, head_dim, backend):
    """Both used to divide by zero (the fallback's chunking, the default 1 / sqrt(d)) or return empty scores."""
    with pytest.raises(ValueError, match=rf"{op}: q needs at least one head of size >= 1, got shape \(1, {heads}, "):
        KERNEL_CALLS[op](attention_inputs(heads, kv_heads, head_dim), backend)


def test_window_match_refuses_rows_without_features(backend):
    """A cosine of zero-width rows is 0 everywhere: every A token would pick the first B token."""
    rows, offsets = torch.arange(4), torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r"window_best_match: x must be \(N, D\) with D >= 1"):
        window_match.window_best_match(torch.zeros(4, 0), rows[:2], offsets, rows[2:], offsets, backend=backend)
