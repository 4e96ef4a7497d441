"""Inputs shared by the kernel property tests: the dtypes they cover and (B, H, S, d) heads of any layout."""

from __future__ import annotations

import numpy as np
import torch

# bf16 too through Triton under the interpreter: the kernels upcast bf16 tiles there (triton-lang/triton#11584).
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def to_np(t: torch.Tensor) -> np.ndarray:
    """The exact values the kernel sees (low-precision inputs included), in float64."""
    return t.detach().cpu().to(torch.float64).numpy() if t.is_floating_point() else t.detach().cpu().numpy()


def make_heads(gen: torch.Generator, shape: tuple[int, int, int, int], layout: str, dtype, mag: float, device):
    """A (B, H, S, d) tensor, contiguous or not."""
    b, h, s, d = shape
    if layout == "bshd":  # what a (B, S, H, d) projection gives after .transpose(1, 2)
        t = (torch.randn(b, s, h, d, generator=gen) * mag).to(dtype).transpose(1, 2)
    elif layout == "wide":  # a slice of a wider head dimension
        t = (torch.randn(b, h, s, d + 5, generator=gen) * mag).to(dtype)[..., 2 : 2 + d]
    else:
        t = (torch.randn(b, h, s, d, generator=gen) * mag).to(dtype)
    return t.to(device)
