"""Where result files go and the header every one of them carries (the benchmarks' and the compile check's): what
ran, where, with which versions."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parent.parent
#: perf/results in a source checkout (where the results are committed); ./lightkv-results for an installed package.
RESULTS = _ROOT / "perf" / "results" if (_ROOT / "perf" / "README.md").exists() else Path("lightkv-results")


def run_record(benchmark: str, command: str | None = None) -> dict:
    """The header of a result file: ``benchmark``, the ``command`` (default: this process's command line), the
    machine (the CUDA device, else the CPU) and the versions (Python, torch, triton and transformers where
    imported, the git commit)."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "unknown")
    versions["commit"] = git_commit()
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        machine = {
            "device": torch.cuda.get_device_name(),
            "memory_bytes": properties.total_memory,
            "multiprocessors": properties.multi_processor_count,
            "cuda": torch.version.cuda,
        }
    else:
        machine = {"device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"}
    machine["platform"] = platform.platform()
    if command is None:
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    return {"benchmark": benchmark, "command": command, "machine": machine, "versions": versions}


def git_commit() -> str:
    """The checkout's short commit hash, or ``"unknown"`` outside a git checkout."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=_ROOT
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
