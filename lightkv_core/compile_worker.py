"""Ahead-of-time compiles of the Triton kernels for an NVIDIA target, on a machine without a GPU: the worker process
of :mod:`lightkv_core.compile_check` (``python -m lightkv_core.compile_worker JOBS RESULTS``: pickled jobs in,
records out as JSON).

A job names a kernel, a stage shape, a dtype, a target and a config. The kernel's real launch wrapper runs on CPU
tensors of that stage (:func:`~lightkv_core.kernel_problems.kernel_problems`) while :class:`CompileOnlyDriver` stands
for a GPU of the target and Triton's ``jit_cache_hook`` reports every launch as handled. So Triton binds and
specialises the wrapper's arguments exactly as for a real launch (pointer dtypes, integers divisible by 16 or equal
to 1, constexprs such as DOT_MODE as on a GPU), hands the result to the hook, and launches nothing. The kept
specialisation is compiled with ``triton.compile`` for the target, and the result read: registers and spills
(ptxas's log), shared memory (the kernel's metadata) and tensor-core instructions (its SASS, from ``nvdisasm``).

The process must start with ``TRITON_INTERPRET`` unset, so the kernels are ``triton.jit`` functions. It turns
Triton's ``always_compile`` on, so every compile runs ptxas and prints its log.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TextIO

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.compiler import ASTSource
from triton.runtime.driver import driver

from lightkv_core.errors import error_line
from lightkv_core.kernel_problems import KernelProblem, kernel_problems
from lightkv_core.kernels.tuning import default_config, parse_key
from lightkv_core.stage_shapes import StageShape

PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
SASS_OPCODE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", re.MULTILINE)
#: Tensor-core matrix multiplies: HMMA (sm_80, and sm_90 without wgmma), HGMMA (sm_90 wgmma), UTC*MMA (sm_100).
TENSOR_CORE_OPCODE = re.compile(r"HMMA|HGMMA|UTC\w*MMA")


@dataclass(frozen=True)
class CompileJob:
    """Compile ``kernel`` for ``target`` (``"sm_90"``: any NVIDIA compute capability Triton knows) on the problems
    of ``shape`` in ``dtype`` (a dtype name): the one with shape key ``key`` (None: each; the attention statistics
    have one per query set), with ``config`` (None: each problem's default)."""

    kernel: str
    shape: StageShape
    dtype: str
    target: str
    key: str | None = None
    config: dict[str, int] | None = None


@dataclass
class CompileRecord:
    """One compile: what it used, or ``error`` (the compiler's message, shortened; the sizes are then None).

    Sizes in bytes: ``spill_stores`` / ``spill_loads`` what ptxas stores to and loads from local memory for spilled
    registers, ``stack`` its stack frame, ``shared_memory`` per block. ``registers`` per thread; ``tensor_core_ops``
    the tensor-core instructions in the SASS; ``compile_s`` seconds (of the first compile of a specialisation)."""

    kernel: str
    key: str
    dtype: str
    target: str
    config: dict[str, int]
    compile_s: float
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared_memory: int | None = None
    tensor_core_ops: int | None = None
    error: str | None = None


class CompileOnlyDriver(DriverBase):
    """Stands for a GPU of ``target`` while launch wrappers run: Triton asks the active driver for the device, its
    stream and its target before it specialises a launch. It can run nothing."""

    def __init__(self, target: GPUTarget) -> None:
        self.target = target

    @classmethod
    def is_active(cls) -> bool:
        return False

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return self.target.arch  # one device per target: Triton keeps a specialiser per device

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("a compile-only driver builds no launcher")

    def get_benchmarker(self) -> None:
        raise NotImplementedError("a compile-only driver times nothing")


@dataclass(frozen=True)
class Specialization:
    """What Triton would compile for one launch: the JIT function, its argument types, constant arguments,
    alignment attributes and options."""

    kernel: triton.runtime.jit.JITFunction
    signature: dict
    constants: dict
    attrs: dict
    options: dict

    def identity(self) -> str:
        """Equal for two launches that compile to the same code (the options name the target)."""
        name = f"{self.kernel.module}.{self.kernel.fn.__name__}"
        return repr((name, self.signature, self.constants, self.attrs, self.options))


def specialize(problem: KernelProblem, config: dict[str, int], target: GPUTarget) -> Specialization:
    """The specialisation of ``problem.kernel`` that ``problem.launch(config)`` asks Triton for, on ``target``."""
    launches = []

    def keep(*, fn: object, compile: dict, **_: object) -> bool:
        launches.append((fn.jit_function, compile))
        return True  # handled: Triton compiles and launches nothing

    module, _, name = problem.kernel.rpartition(".")
    module, name = f"lightkv_core.kernels.{module or name}", f"{name}_kernel"
    previous = knobs.runtime.jit_cache_hook
    driver.set_active(CompileOnlyDriver(target))
    knobs.runtime.jit_cache_hook = keep
    try:
        problem.launch(config)
    finally:
        knobs.runtime.jit_cache_hook = previous
    mine = [(fn, seen) for fn, seen in launches if fn.module == module and fn.fn.__name__ == name]
    if len(mine) != 1:
        raise RuntimeError(f"{problem.kernel}: the launch wrapper launched {module}.{name} {len(mine)} times, not once")
    fn, seen = mine[0]
    # the options as Triton serialises them for JITFunction.preload: JSON, so tuples come back as lists
    options = json.loads(seen["specialization_data"])["options"]
    options = {option: tuple(v) if isinstance(v, list) else v for option, v in options.items()}
    return Specialization(fn, seen["signature"], seen["constants"], seen["configs"][0], options)


def compile_resources(specialization: Specialization, target: GPUTarget) -> dict[str, int | float]:
    """Compile for ``target`` and read the resources (the :class:`CompileRecord` fields from ``compile_s`` on)."""
    source = ASTSource(specialization.kernel, specialization.signature, specialization.constants, specialization.attrs)
    log = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(log):  # ptxas's log (and, on failure, Triton's reproducer) is printed
        kernel = triton.compile(source, target=target, options=specialization.options)
    seconds = time.perf_counter() - start
    registers, frame = PTXAS_REGISTERS.search(log.getvalue()), PTXAS_FRAME.search(log.getvalue())
    if registers is None or frame is None:
        raise RuntimeError("ptxas printed no resource usage (is TRITON_ALWAYS_COMPILE on?)")
    stack, stores, loads = (int(value) for value in frame.groups())
    return {
        "compile_s": round(seconds, 3),
        "registers": int(registers.group(1)),
        "spill_stores": stores,
        "spill_loads": loads,
        "stack": stack,
        "shared_memory": int(kernel.metadata.shared),
        "tensor_core_ops": tensor_core_ops(kernel.asm["cubin"]),
    }


def tensor_core_ops(cubin: bytes) -> int:
    """How many tensor-core instructions the SASS of ``cubin`` holds (``nvdisasm``, shipped with Triton)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        sass = subprocess.run(
            [knobs.nvidia.nvdisasm.path, "-c", file.name], capture_output=True, text=True, check=True
        ).stdout
    opcodes = SASS_OPCODE.findall(sass)
    if not opcodes:
        raise RuntimeError("nvdisasm printed no instructions")
    return sum(1 for opcode in opcodes if TENSOR_CORE_OPCODE.match(opcode))


def run_jobs(jobs: list[CompileJob], progress: TextIO | None = None) -> list[CompileRecord]:
    """Compile every job (its problems built once per shape, dtype and kernel; each specialisation compiled once),
    writing a line to ``progress`` after each job. For a worker process only: it replaces Triton's active driver and
    turns ``always_compile`` on for good."""
    if knobs.runtime.interpret:
        raise RuntimeError("compile jobs need TRITON_INTERPRET unset: the interpreter's kernels cannot be compiled")
    knobs.compilation.always_compile = True
    knobs.nvidia.dump_ptxas_log = True
    problems: dict[tuple[str, str, str], list[KernelProblem]] = {}
    compiled: dict[str, dict[str, int | float | str]] = {}
    records = []
    for job in jobs:
        capability = int(job.target.removeprefix("sm_"))
        target = GPUTarget("cuda", capability, 32)
        built = (job.shape.label, job.dtype, job.kernel)
        if built not in problems:
            dtype = getattr(torch, job.dtype)
            problems[built] = list(kernel_problems([job.kernel], job.shape, torch.device("cpu"), dtype))
        for problem in problems[built]:
            if job.key is not None and problem.key != job.key:
                continue
            config = job.config or default_config(job.kernel, parse_key(problem.key))
            record = CompileRecord(job.kernel, problem.key, job.dtype, job.target, config, 0.0)
            try:
                specialization = specialize(problem, config, target)
            except Exception as error:  # the launch wrapper refused the config
                records.append(replace(record, error=error_line(error, 200)))
                continue
            identity = specialization.identity()
            if identity not in compiled:
                try:
                    compiled[identity] = compile_resources(specialization, target)
                except Exception as error:  # any compiler failure is recorded, not raised
                    compiled[identity] = {"error": error_line(error, 200)}
            records.append(replace(record, **compiled[identity]))
        if progress is not None:
            print(f"{job.kernel} {job.dtype} {job.target}", file=progress, flush=True)
    return records


def main(argv: list[str]) -> int:
    """``JOBS RESULTS``: read the pickled jobs, write the records as a JSON list of their fields; a line on stdout
    per job."""
    jobs_path, results_path = (Path(arg) for arg in argv)
    records = run_jobs(pickle.loads(jobs_path.read_bytes()), progress=sys.stdout)
    results_path.write_text(json.dumps([asdict(record) for record in records]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
