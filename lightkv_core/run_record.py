"""Where result files go and the header every one of them carries (the benchmarks' and the compile check's): what
ran, where, with which versions.

Every command that writes results (``lightkv bench``, ``eval``, ``calibrate``, ``autotune --compile-only``) writes
them to its ``--out``, by default :func:`results_dir`: ``$LIGHTKV_RESULTS_DIR``, else ``~/.cache/lightkv/results``;
never into the installed package or a source checkout unless ``--out`` says so (the committed results are
regenerated with ``--out perf/results``). :func:`output_dir` and :func:`output_file` create and check the
destination before a command's long run, so a folder it cannot write is one usage error up front.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lightkv_core.errors import UsageError

_ROOT = Path(__file__).resolve().parent.parent
RESULTS_ENV = "LIGHTKV_RESULTS_DIR"
#: How :func:`results_dir` is chosen, for the commands' ``--help``.
RESULTS_HELP = f"${RESULTS_ENV}, else ~/.cache/lightkv/results"


def results_dir() -> Path:
    """The default folder of every command's results: ``$LIGHTKV_RESULTS_DIR`` if set, else
    ``~/.cache/lightkv/results`` (beside the tuning cache, ``~/.cache/lightkv``)."""
    configured = os.environ.get(RESULTS_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "lightkv" / "results"


def _named(folder: Path, out: str | Path | None, option: str) -> tuple[str, str]:
    """How an error names the destination folder, and the fix: by the option the user passed, else by where the
    default came from."""
    if out is not None:
        return f"{option} {folder}", f"pass {option} a folder you can write to"
    if os.environ.get(RESULTS_ENV):
        return f"{RESULTS_ENV}={folder}", f"point {RESULTS_ENV} at a folder you can write to"
    return f"the results folder {folder}", f"set {RESULTS_ENV} to a folder you can write to, or pass {option}"


def output_dir(out: str | Path | None, option: str = "--out") -> Path:
    """The folder a command writes into: ``out``, else :func:`results_dir`, created and checked writable (a file
    made and removed there). Call it before the command's work, so a bad destination fails at once.

    Raises:
        UsageError: the folder is a file, or cannot be created or written; one line naming it and the fix.
    """
    folder = Path(results_dir() if out is None else out).expanduser()
    named, fix = _named(folder, out, option)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{named} is a file, not a folder; {fix}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UsageError(f"{named}: cannot write there ({error.strerror or error}); {fix}") from None
    return folder


def output_file(out: str | Path | None, default_name: str, option: str = "--out") -> Path:
    """The file a command writes: ``out``, else ``default_name`` in :func:`results_dir`; its folder created and
    checked as by :func:`output_dir`, and the path itself no folder.

    Raises:
        UsageError: as :func:`output_dir`, or the path is a folder.
    """
    path = results_dir() / default_name if out is None else Path(out).expanduser()
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; pass {option} a file name, e.g. {path / default_name}")
    output_dir(path.parent if out is not None else None, option)
    return path


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
