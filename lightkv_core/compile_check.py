"""The ahead-of-time compile check of the Triton kernels, on a machine with or without a GPU (README, "Compile
check").

Kernels are compiled for NVIDIA targets on real stage shapes, and each compile's registers, spills, shared memory
and tensor-core instructions recorded (:class:`~lightkv_core.compile_worker.CompileRecord`):

- ``lightkv autotune --compile-only [--target sm_90]`` compiles every kernel's default config for every dtype
  (:func:`default_jobs`), writes ``compile-<target>.json`` (:func:`write_table`) and fails on :func:`default_problems`;
- ``lightkv autotune`` compiles every candidate for the GPU's own target before timing it, and ``lightkv autotune
  --dry-run --target sm_90`` for the named target, and drops those :func:`prune_reason` refuses.

The compiles run in worker processes (:mod:`lightkv_core.compile_worker`) started without ``TRITON_INTERPRET`` and
with a Triton cache of their own, so they depend neither on this process's interpreter setting nor on kernels
compiled earlier.
"""

from __future__ import annotations

import json
import os
import pickle
import selectors
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from lightkv_core.compile_worker import CompileJob, CompileRecord
from lightkv_core.kernel_problems import kernel_problems
from lightkv_core.kernels.tuning import DTYPE_NAMES, KERNELS, default_config, dtype_name, parse_key
from lightkv_core.run_record import output_dir, run_record
from lightkv_core.stage_shapes import StageShape

#: Shared memory one block may use on each target, in bytes (the opt-in maximum of dynamic shared memory).
SHARED_MEMORY_LIMITS = {"sm_80": 166_912, "sm_90": 232_448, "sm_100": 232_448}
#: The kernels whose fp16/bf16 tiles go through ``tl.dot``, so their SASS must hold tensor-core instructions.
#: window_match sums elementwise products instead, for its tie rule (lightkv_core/kernels/window_match.py).
MATMUL_KERNELS = ("scoring.column_lse", "scoring.row_sum", "attention_stats.row_lse", "attention_stats.column_sum")
#: The first words of every :func:`prune_reason`.
PRUNE_CAUSES = ("fails to compile", "spills registers", "exceeds shared memory")
_ROOT = Path(__file__).resolve().parent.parent


def default_jobs(
    jobs: list[tuple[list[str], StageShape]], targets: list[str], dtypes: tuple[str, ...] = DTYPE_NAMES
) -> list[CompileJob]:
    """The default config of every kernel of each ``(kernels, shape)`` pair, in every dtype, for every target."""
    return [
        CompileJob(kernel, shape, dtype, target)
        for kernels, shape in jobs
        for kernel in kernels
        for dtype in dtypes
        for target in targets
    ]


def compile_all(
    jobs: list[CompileJob],
    workers: int | None = None,
    triton_cache: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[CompileRecord]:
    """Run ``jobs`` in ``workers`` processes (default: one per CPU core). Jobs of one kernel, dtype, target and config
    go to one worker, which compiles a specialisation once however many stages share it. ``triton_cache``: the
    workers' Triton cache (default: a temporary folder). ``progress`` gets a line per finished job.

    Returns:
        One record per kernel, shape key, dtype, target and config, in kernel, dtype, target, key order.

    Raises:
        RuntimeError with the end of a worker's stderr if a worker fails (a compile failure is a record, not this).
    """
    groups: dict[str, list[CompileJob]] = {}
    for job in jobs:
        groups.setdefault(json.dumps([job.kernel, job.dtype, job.target, job.config]), []).append(job)
    shares: list[list[CompileJob]] = [[] for _ in range(max(1, min(workers or os.cpu_count() or 1, len(groups))))]
    for group in sorted(groups.values(), key=len, reverse=True):
        min(shares, key=len).extend(group)
    with tempfile.TemporaryDirectory(prefix="lightkv-compile-") as scratch:
        env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(triton_cache or Path(scratch) / "triton")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(_ROOT), env.get("PYTHONPATH"))))
        processes = []
        for index, share in enumerate(shares):
            paths = [Path(scratch) / f"{kind}-{index}" for kind in ("jobs", "records", "stderr")]
            paths[0].write_bytes(pickle.dumps(share))
            with paths[2].open("w") as stderr:
                command = [sys.executable, "-m", "lightkv_core.compile_worker", str(paths[0]), str(paths[1])]
                process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
            processes.append((process, paths))
        _follow([process for process, _ in processes], progress)
        records: list[CompileRecord] = []
        for process, (_, results, stderr) in processes:
            if process.wait() != 0:
                tail = stderr.read_text()[-3000:]
                raise RuntimeError(f"a compile worker failed (exit status {process.returncode}):\n{tail}")
            records.extend(CompileRecord(**fields) for fields in json.loads(results.read_text()))
    return _unique(records)


def _follow(processes: list[subprocess.Popen], progress: Callable[[str], None] | None) -> None:
    """Pass every line the workers print to ``progress`` until they close their output."""
    selector = selectors.DefaultSelector()
    for process in processes:
        selector.register(process.stdout, selectors.EVENT_READ)
    while selector.get_map():
        for key, _ in selector.select():
            line = key.fileobj.readline()
            if not line:
                selector.unregister(key.fileobj)
            elif progress is not None:
                progress(line.strip())


def _unique(records: list[CompileRecord]) -> list[CompileRecord]:
    """One record per kernel, key, dtype, target and config (stages may share a key), sorted."""
    kernels, dtypes = list(KERNELS), list(DTYPE_NAMES)
    seen = {(r.kernel, r.key, r.dtype, r.target, json.dumps(r.config)): r for r in records}
    return sorted(
        seen.values(),
        key=lambda r: (kernels.index(r.kernel), dtypes.index(r.dtype), int(r.target[3:]), r.key, json.dumps(r.config)),
    )


def prune_reason(record: CompileRecord, shared_memory_limit: int) -> str | None:
    """Why a compiled config cannot serve on its target, starting with one of :data:`PRUNE_CAUSES`: it fails to
    compile, spills registers, or needs more than ``shared_memory_limit`` bytes of shared memory per block; None
    if it can."""
    if record.error is not None:
        return f"fails to compile: {record.error}"
    if record.spill_stores or record.spill_loads:
        return f"spills registers: {record.spill_stores} B stored, {record.spill_loads} B loaded"
    if record.shared_memory > shared_memory_limit:
        return f"exceeds shared memory: {record.shared_memory:,} B per block, {shared_memory_limit:,} B allowed"
    return None


def default_problems(records: list[CompileRecord]) -> list[str]:
    """What is wrong with defaults compiled for the targets of :data:`SHARED_MEMORY_LIMITS`: any
    :func:`prune_reason`, a matmul kernel (:data:`MATMUL_KERNELS`) without tensor-core instructions on fp16/bf16
    tiles, or with some on float32 tiles (float32 dots are IEEE: TF32 would round the inputs to 10 mantissa bits)."""
    problems = []
    for record in records:
        where = f"{record.kernel} [{record.key}] on {record.target}"
        reason = prune_reason(record, SHARED_MEMORY_LIMITS[record.target])
        if reason is not None:
            problems.append(f"{where}: {reason}")
        elif record.kernel in MATMUL_KERNELS and (record.tensor_core_ops > 0) != (record.dtype != "float32"):
            problems.append(f"{where}: {record.tensor_core_ops} tensor-core instructions")
    return problems


def write_table(records: list[CompileRecord], target: str, shapes: list[StageShape], command: str, path: Path) -> Path:
    """``path``: the run record, the target, its shared-memory limit, the stage shapes, and one entry per record
    (sizes in bytes, times in seconds)."""
    content = {
        **run_record("compile", command),
        "target": target,
        "shared_memory_limit": SHARED_MEMORY_LIMITS.get(target),
        "shapes": [f"{shape.label}: {shape.describe()}" for shape in shapes],
        "compiles": [asdict(record) for record in records],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")
    return path


def format_table(records: list[CompileRecord]) -> str:
    """A text table of ``records``: kernel, shape key, dtype, config, registers, spill stores/loads (B), shared
    memory (KiB), tensor-core instructions, compile time."""
    header = (
        f"{'kernel':<26} {'shape key':<34} {'dtype':<8} {'config':<50} {'regs':>4} {'spill st/ld':>11} "
        f"{'smem KiB':>8} {'TC ops':>6} {'time':>6}"
    )
    lines = [header, "-" * len(header)]
    for r in records:
        key = ",".join(part for part in r.key.split(",") if not part.startswith("dtype="))
        config = " ".join(f"{param.removeprefix('BLOCK_')}={value}" for param, value in r.config.items())
        if r.error is not None:
            lines.append(f"{r.kernel:<26} {key:<34} {r.dtype:<8} {config:<50} {r.error}")
            continue
        lines.append(
            f"{r.kernel:<26} {key:<34} {r.dtype:<8} {config:<50} {r.registers:>4} "
            f"{f'{r.spill_stores}/{r.spill_loads}':>11} {r.shared_memory / 1024:>8.1f} {r.tensor_core_ops:>6} "
            f"{r.compile_s:>5.1f}s"
        )
    return "\n".join(lines)


def static_prune(
    jobs: list[tuple[list[str], StageShape]],
    dtype: torch.dtype,
    target: str,
    shared_memory_limit: int,
    candidates: Callable[[str, str], list[dict[str, int]]],
    progress: Callable[[str], None],
) -> Pruning:
    """Compile for ``target`` (``"sm_90"``) the ``candidates(kernel, key)`` of each job's kernels on its full
    shape (the problems built on the CPU, never launched), and refuse those that fail to compile, spill registers or
    need more than ``shared_memory_limit`` bytes of shared memory per block (:func:`prune_reason`)."""
    wanted: dict[tuple[str, str], list[CompileJob]] = {}
    for kernels, shape in jobs:
        for problem in kernel_problems(kernels, shape, torch.device("cpu"), dtype):
            if (problem.kernel, problem.key) not in wanted:
                wanted[(problem.kernel, problem.key)] = [
                    CompileJob(problem.kernel, shape, dtype_name(dtype), target, problem.key, config)
                    for config in candidates(problem.kernel, problem.key)
                ]
    pruning = Pruning(target)
    for record in compile_all([job for group in wanted.values() for job in group], progress=progress):
        pruning.add(record, shared_memory_limit)
    return pruning


def report_compiles(
    records: list[CompileRecord], targets: list[str], shapes: list[StageShape], out: Path, command: str
) -> int:
    """``lightkv autotune --compile-only``: print a table per target, write ``out/compile-<target>.json`` and the
    :func:`default_problems`; 0 if there are none, 1 otherwise. A folder ``out`` that cannot be written is a
    UsageError (:func:`~lightkv_core.run_record.output_dir`)."""
    out = output_dir(out)
    for target in targets:
        mine = [record for record in records if record.target == target]
        print(f"\n{target} (shared memory per block: {SHARED_MEMORY_LIMITS[target]:,} B)\n{format_table(mine)}")
        print(f"wrote {write_table(mine, target, shapes, command, out / f'compile-{target}.json')}")
    problems = default_problems(records)
    for problem in problems:
        print(problem)
    verdict = f"{len(problems)} problem(s)" if problems else "no default fails, spills or exceeds shared memory"
    print(f"\n{len(records)} defaults compiled: {verdict}.")
    return 1 if problems else 0


def config_text(config: dict[str, int]) -> str:
    """``"BLOCK_D=1024 num_warps=4 num_stages=3"``."""
    return " ".join(f"{param}={value}" for param, value in config.items())


@dataclass
class Pruning:
    """What static pruning compiled and refused, for autotune: ``tried`` configs per kernel and ``refused``
    (kernel, shape key) -> {:func:`config_text`: :func:`prune_reason`}."""

    target: str
    tried: dict[str, int] = field(default_factory=dict)
    refused: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)

    def add(self, record: CompileRecord, shared_memory_limit: int) -> None:
        self.tried[record.kernel] = self.tried.get(record.kernel, 0) + 1
        reason = prune_reason(record, shared_memory_limit)
        if reason is not None:
            self.refused.setdefault((record.kernel, record.key), {})[config_text(record.config)] = reason

    def summary(self) -> str:
        """A line per kernel: configs compiled, refused, and how many for each of :data:`PRUNE_CAUSES`."""
        lines = [f"static pruning for {self.target}: configs compiled and refused before timing"]
        for kernel, tried in self.tried.items():
            reasons = [r for (name, _), refused in self.refused.items() if name == kernel for r in refused.values()]
            causes = {cause: sum(r.startswith(cause) for r in reasons) for cause in PRUNE_CAUSES}
            why = ", ".join(f"{count} {cause}" for cause, count in causes.items() if count)
            lines.append(f"  {kernel:<26} {tried:>4} compiled, {len(reasons):>4} refused{f' ({why})' if why else ''}")
        lines += [f"  {line}" for line in self.refused_defaults()]
        return "\n".join(lines)

    def refused_defaults(self) -> list[str]:
        """A line per shape whose default config was refused (timed anyway by autotune, a failure of the dry run)."""
        return [
            f"{kernel} [{key}]: the default {config} {reason}"
            for (kernel, key), refused in self.refused.items()
            for config, reason in refused.items()
            if config == config_text(default_config(kernel, parse_key(key)))
        ]
