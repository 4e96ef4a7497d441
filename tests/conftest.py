"""Shared test setup.

- ``TRITON_INTERPRET`` defaults to ``1`` (set before anything imports triton), so the Triton kernels run on
  CPU tensors; export ``TRITON_INTERPRET=0`` on a GPU machine to run the same tests compiled on CUDA.
- Hypothesis profiles: ``ci`` (default, derandomised) and ``dev``; pick one with ``HYPOTHESIS_PROFILE``.
- The ``device`` fixture: where test tensors live; the ``backend`` fixture: every kernel test runs for both the
  PyTorch fallback and Triton (the Triton case is skipped where it cannot run; see ``helpers/backends.py``).
- Tests are grouped by layer (``kernels/``, ``core/``, ``methods/``, ``adapters/``, ``tools/``); their helpers are
  the package ``helpers/`` (``tests/`` is on pytest's ``pythonpath``, see ``pyproject.toml``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers.backends import DEVICE, backend_params  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_COMMON_PROFILE = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", derandomize=True, **_COMMON_PROFILE)
settings.register_profile("dev", derandomize=False, **_COMMON_PROFILE)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def device() -> str:
    return DEVICE


@pytest.fixture(scope="session", params=backend_params())
def backend(request) -> str:
    """Session-scoped (so Hypothesis ``@given`` tests may use it) and parametrised over the backends."""
    return request.param


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for modules of tiny matrices: more threads only add overhead (and stall badly
    on a busy machine). Use with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
