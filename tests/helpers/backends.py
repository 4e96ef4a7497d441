"""Where the tests run: the device, and which kernel backends can run there (``tests/conftest.py`` sets
``TRITON_INTERPRET=1`` unless the caller set it, before anything imports triton)."""

from __future__ import annotations

import os

import pytest
import torch

from lightkv_core.kernels.launch import TRITON_AVAILABLE

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if not INTERPRETING and torch.cuda.is_available() else "cpu"

BACKENDS = ("torch", "triton")


def triton_skip_reason() -> str | None:
    """Why the Triton backend cannot run here, or ``None``."""
    if not TRITON_AVAILABLE:
        return "triton is not installed"
    if DEVICE == "cpu" and not INTERPRETING:
        return "no CUDA device and TRITON_INTERPRET != 1"
    return None


def backend_params() -> list:
    """``pytest.param`` for every backend, the Triton one skipped where it cannot run."""
    reason = triton_skip_reason()
    return [
        pytest.param(
            name, id=name, marks=pytest.mark.skipif(name == "triton" and reason is not None, reason=reason or "")
        )
        for name in BACKENDS
    ]
