"""Every Triton launch states its FP-fusion choice (``launch.FP_FUSION``) instead of relying on Triton's default,
which Triton 3.9 warns flips in 3.10."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers.backends import triton_skip_reason

from lightkv_core.kernels import attention_stats, launch, scoring, window_match

# the package exports the function merge_compact under the module's name
merge_module = importlib.import_module("lightkv_core.kernels.merge_compact")

pytestmark = pytest.mark.skipif(triton_skip_reason() is not None, reason=str(triton_skip_reason()))

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
