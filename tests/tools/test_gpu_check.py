"""``scripts/gpu-check.sh`` on a machine without a CUDA device: one clear line and exit status 2, nothing run.

The test skips the script's set-up (``LIGHTKV_GPU_CHECK_SKIP_SETUP=1``): the suite already runs in the set-up
``.venv``, and re-installing it under other running tests is not this test's business.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the script would run the check")
def test_without_a_cuda_device_it_says_so_and_exits_2(tmp_path):
    env = {**os.environ, "LIGHTKV_GPU_CHECK_SKIP_SETUP": "1", "LIGHTKV_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    assert done.stderr == "gpu-check: no CUDA device (torch.cuda.is_available() is False); nothing to check\n"
    assert not any(tmp_path.iterdir())  # nothing tuned


def test_it_is_strict_and_bounds_every_step():
    text = SCRIPT.read_text()
    assert "set -euo pipefail" in text
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    # every command that runs a check goes through step(), which runs it under timeout
    for command in ("pytest", "autotune", "bench scoring", "bench kernels", "bench prefill"):
        assert any(line.lstrip().startswith("step ") and command in line for line in text.splitlines()), command
