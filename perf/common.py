"""What every benchmark shares: the run record (machine, versions, command), timing, peak memory, result files.

Timing rules (see ``perf/README.md``): compared implementations run side by side in one process; on a CPU only
their ratios are reported, absolute times come from a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

# the result folder and the run record are the compile check's too, so they live in the core
from lightkv_core.run_record import RESULTS_HELP
from lightkv_core.run_record import output_dir as output_dir
from lightkv_core.run_record import run_record as run_record


def device() -> torch.device:
    """The device benchmarks run on: the current CUDA GPU if there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_tag() -> str:
    """Short name of the device for result file names: ``cpu``, ``h100``, ``h200``, ... (else a slug of the name)."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    known = re.search(r"\b([ahlbv]\d{2,3}|gb?\d{3})\b", name)
    return known.group(1) if known else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds.

    On a GPU this is Triton's ``do_bench`` (CUDA events, L2 flushed between calls, ``repeats`` ignored in favour of
    its time budget); on a CPU, ``warmup`` untimed calls, then the median of ``repeats`` timed ones.
    """
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak memory ``fn()`` allocates beyond what is already live (its output included), in bytes.

    On a GPU from the CUDA caching allocator's statistics; on a CPU from PyTorch's memory profiler, which records
    every tensor allocation and release (``torch.profiler`` with ``profile_memory=True``).
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with (
        _quiet_stderr(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof,
    ):
        fn()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action.name == "CREATE":
            live += size
        elif action.name == "DESTROY":
            live -= size
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: the profiler's C++ side logs a line on every start and stop (Python
    exceptions still propagate, after stderr is restored)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def write_json(result: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--quick`` and ``--out``, which every ``lightkv bench`` benchmark takes (``--out`` is ``None`` unless given:
    a benchmark resolves it with :func:`output_dir` before it measures anything)."""
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats (the CPU run from the README)")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"folder for the JSON and PNG results (default {RESULTS_HELP})"
    )
