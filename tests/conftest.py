"""Shared test setup.

- ``TRITON_INTERPRET`` defaults to ``1`` (set before anything imports triton), so the Triton kernels run on
  CPU tensors; export ``TRITON_INTERPRET=0`` on a GPU machine to run the same tests compiled on CUDA.
- Hypothesis profiles: ``ci`` (default, derandomised) and ``dev``; pick one with ``HYPOTHESIS_PROFILE``.
- ``DEVICE`` / the ``device`` fixture: where test tensors live.
- ``BACKENDS`` / the ``backend`` fixture: every kernel test runs for both the PyTorch fallback and Triton
  (the Triton case is skipped where it cannot run).
- ``tests/`` is put on ``sys.path`` so tests can ``from oracle import ...``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from lightkv_core.kernels.launch import TRITON_AVAILABLE  # noqa: E402

_COMMON_PROFILE = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", derandomize=True, **_COMMON_PROFILE)
settings.register_profile("dev", derandomize=False, **_COMMON_PROFILE)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

INTERPRETING = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cuda" if not INTERPRETING and torch.cuda.is_available() else "cpu"

BACKENDS = ("torch", "triton")


def _triton_skip_reason() -> str | None:
    if not TRITON_AVAILABLE:
        return "triton is not installed"
    if DEVICE == "cpu" and not INTERPRETING:
        return "no CUDA device and TRITON_INTERPRET != 1"
    return None


def backend_params() -> list:
    """``pytest.param`` for every backend, the Triton one skipped where it cannot run."""
    reason = _triton_skip_reason()
    return [
        pytest.param(
            name, id=name, marks=pytest.mark.skipif(name == "triton" and reason is not None, reason=reason or "")
        )
        for name in BACKENDS
    ]


@pytest.fixture(scope="session")
def device() -> str:
    return DEVICE


@pytest.fixture(scope="session", params=backend_params())
def backend(request) -> str:
    """Session-scoped (so Hypothesis ``@given`` tests may use it) and parametrised over ``BACKENDS``."""
    return request.param


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for modules of tiny matrices: more threads only add overhead (and stall badly
    on a busy machine). Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
