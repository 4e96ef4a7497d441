"""``lightkv autotune``: pick the fastest launch config of every Triton kernel for the shapes a model's LightKV
stages run (:mod:`lightkv_core.stage_shapes`), on the current GPU, and store it where the kernels read it at launch
(:mod:`lightkv_core.kernels.tuning`). Every candidate is first compiled for the GPU's target and dropped if it fails
to compile, spills registers or exceeds shared memory (:func:`~lightkv_core.compile_check.static_prune`); a
candidate is accepted only if its output matches the PyTorch fallback's (:mod:`lightkv_core.kernel_problems`).
Without a GPU, :func:`dry_run` checks every distinct tiling under the Triton interpreter instead (and, with
``--target``, prunes statically for that target), and ``--compile-only`` compiles the defaults
(:mod:`lightkv_core.compile_check`). See the README, "Benchmarks and autotuning".
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from lightkv_core.compile_check import (
    SHARED_MEMORY_LIMITS,
    Pruning,
    compile_all,
    config_text,
    default_jobs,
    report_compiles,
    static_prune,
)
from lightkv_core.config import PRESETS
from lightkv_core.errors import UsageError, error_line
from lightkv_core.kernel_problems import kernel_problems
from lightkv_core.kernels.launch import interpreting
from lightkv_core.kernels.tuning import (
    KERNELS,
    LAUNCH_PARAMS,
    TARGETS,
    TILED_DIMS,
    bucket,
    cache_dir,
    default_config,
    device_name,
    parse_key,
    read_cache,
    store_configs,
    writable_cache,
)
from lightkv_core.run_record import RESULTS_HELP, output_dir
from lightkv_core.stage_shapes import StageShape, parse_shape, preset_shapes, small_shape

# ----------------------------------------------------------------------------------------------
# Candidates, timing, dry run


def candidates(kernel: str, key: str, max_configs: int | None = None) -> list[dict[str, int]]:
    """The configs worth timing for a shape key: the default as it launches untuned (for the key's dtype, tiles
    clamped to the shape) first, then every config whose tiles, query chunk and head block are no larger than the
    (bucketed) dimension they split; at most ``max_configs`` (a seeded sample of the rest)."""
    spec = KERNELS[kernel]
    dims = parse_key(key)
    limits = {**TILED_DIMS, "SPLIT_S": "S", "HEADS_PER_PROGRAM": "H"}
    default = default_config(kernel, dims)
    kept = []
    for config in spec.candidates():
        fits = all(
            value <= bucket(int(dims[limits[param]])) or value == min(spec.space[param])
            for param, value in config.items()
            if limits.get(param) in dims
        )
        if fits and config != default:
            kept.append(config)
    if max_configs is not None and len(kept) > max_configs - 1:
        kept = random.Random(f"{kernel}/{key}").sample(kept, max(0, max_configs - 1))
    return [default, *kept]


def distinct_tilings(kernel: str) -> list[dict[str, int]]:
    """One config per distinct tiling of ``kernel`` (launch parameters at their defaults): what the interpreter
    can tell apart."""
    spec = KERNELS[kernel]
    seen, configs = set(), []
    for config in spec.candidates():
        tiling = tuple((p, v) for p, v in config.items() if p not in LAUNCH_PARAMS)
        if tiling not in seen:
            seen.add(tiling)
            configs.append({**config, **{p: spec.default[p] for p in LAUNCH_PARAMS}})
    return configs


@dataclass
class TunedKernel:
    """What tuning one kernel on one shape found (times in seconds, of the whole op the kernel belongs to)."""

    kernel: str
    key: str
    label: str
    config: dict[str, int]
    time_s: float
    default_time_s: float
    tried: int
    rejected: dict[str, str]

    @property
    def speedup(self) -> float:
        return self.default_time_s / self.time_s


def tune(
    jobs: list[tuple[list[str], StageShape]],
    device: torch.device,
    dtype: torch.dtype,
    max_configs: int | None,
    pruning: Pruning,
    progress: Callable[[str], None],
) -> list[TunedKernel]:
    """Time every candidate config of each job's kernels on its shape (CUDA) but those ``pruning`` refused (the
    default is timed anyway: it is the baseline); a config that fails to compile or launch, or whose output differs
    from the fallback's, is rejected with the reason."""
    from triton.testing import do_bench

    results: dict[tuple[str, str], TunedKernel] = {}
    for kernels, shape in jobs:
        for problem in kernel_problems(kernels, shape, device, dtype):
            if (problem.kernel, problem.key) in results:
                continue  # an earlier stage had the same bucketed shape
            tried = candidates(problem.kernel, problem.key, max_configs)
            refused = pruning.refused.get((problem.kernel, problem.key), {})
            configs = tried[:1] + [config for config in tried[1:] if config_text(config) not in refused]
            times: dict[int, float] = {}
            rejected = {text: reason for text, reason in refused.items() if text != config_text(tried[0])}
            for index, config in enumerate(configs):
                progress(f"{problem.kernel} [{problem.key}] config {index + 1}/{len(configs)}")
                try:
                    problem.check(problem.launch(config))
                    torch.cuda.synchronize(device)
                    times[index] = do_bench(partial(problem.launch, config), warmup=10, rep=50) / 1e3
                except Exception as error:  # any compile/launch/check failure rejects the config
                    rejected[config_text(config)] = error_line(error, 120)
            if 0 not in times:
                raise RuntimeError(f"{problem.kernel} [{problem.key}]: the default config failed: {rejected}")
            best = min(times, key=times.__getitem__)
            results[(problem.kernel, problem.key)] = TunedKernel(
                problem.kernel, problem.key, shape.label, configs[best], times[best], times[0], len(tried), rejected
            )
    return list(results.values())


def dry_run(jobs: list[tuple[list[str], StageShape]], progress: Callable[[str], None]) -> list[TunedKernel]:
    """Under the Triton interpreter: every distinct tiling of each job's kernels on a small version of its shape
    (float32, so the comparison with the fallback is tight). Returns one entry per kernel and small shape with
    the tilings that failed in ``rejected`` (times are 0: nothing is timed)."""
    results: dict[tuple[str, str], TunedKernel] = {}
    for kernels, shape in jobs:
        small = small_shape(shape)
        for problem in kernel_problems(kernels, small, torch.device("cpu"), torch.float32):
            if (problem.kernel, problem.key) in results:
                continue
            configs = distinct_tilings(problem.kernel)
            rejected: dict[str, str] = {}
            for index, config in enumerate(configs):
                progress(f"{problem.kernel} [{problem.key}] tiling {index + 1}/{len(configs)}")
                try:
                    problem.check(problem.launch(config))
                except Exception as error:  # report every failing tiling, not just the first
                    rejected[config_text(config)] = error_line(error, 120)
            results[(problem.kernel, problem.key)] = TunedKernel(
                problem.kernel,
                problem.key,
                small.label,
                KERNELS[problem.kernel].default,
                0.0,
                0.0,
                len(configs),
                rejected,
            )
    return list(results.values())


# ----------------------------------------------------------------------------------------------
# The command

#: Largest --text-tokens and --shape value (tokens, heads or widths): a shape past it only exhausts memory.
MAX_SIZE = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="llava-next",
        help="tune for this model's stages (default llava-next)",
    )
    parser.add_argument(
        "--shape",
        action="append",
        help=f"tune for this shape instead, e.g. S=2880,T=128 (also H, Hk, d, D, W, each 1..{MAX_SIZE}; the rest from "
        "the preset's first stage); repeatable",
    )
    parser.add_argument(
        "--text-tokens",
        type=int,
        default=100,
        help=f"text tokens of the preset's prompt, 1..{MAX_SIZE} (default 100)",
    )
    parser.add_argument("--kernels", help=f"comma-separated subset of {','.join(KERNELS)} (default all)")
    parser.add_argument(
        "--max-configs", type=int, default=64, help="configs timed per kernel and shape, the default included (64)"
    )
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="no GPU needed: check every tiling under the Triton interpreter against the fallback, and the cache files",
    )
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="no GPU needed: compile every kernel's default config in every dtype for NVIDIA targets and write "
        "compile-<target>.json (registers, spills, shared memory, tensor-core instructions)",
    )
    parser.add_argument(
        "--target",
        help=f"with --compile-only, the one target to compile for; with --dry-run, also compile every candidate for "
        f"it and report the ones tuning would drop ({', '.join(TARGETS)})",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"folder of the --compile-only tables (default {RESULTS_HELP})"
    )


def run(args: argparse.Namespace) -> int:
    """``lightkv autotune``: 0 when configs were tuned (or all checked, with ``--dry-run`` or ``--compile-only``),
    1 otherwise."""
    kernels = _checked_kernels(args)
    if args.dry_run and not interpreting():
        # Triton decides at import whether kernels are interpreted: run again with the interpreter on.
        os.execve(
            sys.executable,
            [sys.executable, "-m", "lightkv_core.cli", *args.argv],
            {**os.environ, "TRITON_INTERPRET": "1"},
        )
    if not (args.dry_run or args.compile_only) and (not torch.cuda.is_available() or interpreting()):
        why = (
            "TRITON_INTERPRET=1 is set"
            if interpreting()
            else "no CUDA GPU is visible (torch.cuda.is_available() is False)"
        )
        print(
            f"lightkv autotune: {why}. Autotuning times the kernels on the GPU they will run on, so nothing was tuned "
            "and no cache was written.\nTo check the configs under the Triton interpreter instead: "
            "lightkv autotune --dry-run",
            file=sys.stderr,
        )
        return 1
    if args.compile_only:
        args.out = output_dir(args.out)  # a destination that cannot be written fails before the compiles
    elif not args.dry_run:
        writable_cache(device_name(torch.device("cuda", torch.cuda.current_device())))
    try:
        base = preset_shapes(args.preset, args.text_tokens)
        shapes = [parse_shape(text, base[0]) for text in args.shape] if args.shape else base
    except ValueError as error:
        raise UsageError(str(error)) from error
    # The dropping baselines' statistics run on the whole prompt: with a preset, on the first stage's shape only.
    stage_kernels = [name for name in kernels if not name.startswith("attention_stats.")]
    prompt_kernels = [name for name in kernels if name.startswith("attention_stats.")]
    jobs = [(stage_kernels, shape) for shape in shapes if stage_kernels]
    jobs += [(prompt_kernels, shape) for shape in (shapes if args.shape else shapes[:1]) if prompt_kernels]
    print(f"lightkv autotune: {len(kernels)} kernel(s) over {len(shapes)} shape(s):")
    for shape in shapes:
        print(f"  {shape.label}: {shape.describe()}")
    dtype, targets, pruning = getattr(torch, args.dtype), [args.target] if args.target else list(TARGETS), None
    with tqdm(desc="autotune", unit="run", file=sys.stderr, dynamic_ncols=True) as bar:

        def progress(message: str) -> None:
            bar.set_postfix_str(message, refresh=False)
            bar.update(1)

        if args.compile_only:
            records = compile_all(default_jobs(jobs, targets), progress=progress)
        elif args.dry_run:
            if args.target:
                choose = partial(candidates, max_configs=args.max_configs)
                pruning = static_prune(jobs, dtype, args.target, SHARED_MEMORY_LIMITS[args.target], choose, progress)
            results = dry_run(jobs, progress)
        else:
            device = torch.device("cuda", torch.cuda.current_device())
            major, minor = torch.cuda.get_device_capability(device)
            limit = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
            choose = partial(candidates, max_configs=args.max_configs)
            pruning = static_prune(jobs, dtype, f"sm_{major}{minor}", limit, choose, progress)
            results = tune(jobs, device, dtype, args.max_configs, pruning, progress)
    if args.compile_only:
        return report_compiles(records, targets, shapes, args.out, " ".join(["lightkv", *args.argv]))
    if pruning is not None:
        print(f"\n{pruning.summary()}")
    return _report_dry_run(results, pruning) if args.dry_run else _report_tuning(results, device)


def _checked_kernels(args: argparse.Namespace) -> list[str]:
    """The kernels ``--kernels`` names, after checking the options that need no GPU; UsageError otherwise."""
    kernels = list(KERNELS) if not args.kernels else [name.strip() for name in args.kernels.split(",")]
    unknown = [name for name in kernels if name not in KERNELS]
    if unknown:
        raise UsageError(f"unknown kernel(s) {unknown}; choose from {list(KERNELS)}")
    if args.max_configs < 1:
        raise UsageError(f"--max-configs must be at least 1, got {args.max_configs}")
    if not 1 <= args.text_tokens <= MAX_SIZE:
        raise UsageError(f"--text-tokens must lie in 1..{MAX_SIZE}, got {args.text_tokens}")
    for text in args.shape or ():
        for item in text.split(","):
            value = item.partition("=")[2].strip()
            if value.isdigit() and not (value.isascii() and int(value) <= MAX_SIZE):
                raise UsageError(f"--shape {text!r}: {item.strip()!r} is not an integer in 1..{MAX_SIZE}")
    if args.target is not None and args.target not in TARGETS:
        raise UsageError(f"unknown --target {args.target!r}; choose from {', '.join(TARGETS)}")
    if args.dry_run and args.compile_only:
        raise UsageError("--dry-run and --compile-only cannot be combined")
    if args.target is not None and not (args.dry_run or args.compile_only):
        raise UsageError("--target needs --dry-run or --compile-only (tuning compiles for the GPU it runs on)")
    return kernels


def _report_tuning(results: list[TunedKernel], device: torch.device) -> int:
    import triton

    name = device_name(device)
    entries: dict[str, dict[str, dict]] = {}
    for result in results:
        entries.setdefault(result.kernel, {})[result.key] = {
            "config": result.config,
            "time_s": result.time_s,
            "default_time_s": result.default_time_s,
            "tried": result.tried,
            "rejected": len(result.rejected),
            "stage": result.label,
        }
    path = store_configs(name, triton.__version__, entries)
    header = f"{'kernel':<26} {'shape key':<42} {'chosen config':<58} {'default':>9} {'tuned':>9} {'speedup':>7}"
    print(f"\n{header}\n{'-' * len(header)}")
    for result in results:
        print(
            f"{result.kernel:<26} {result.key:<42} {config_text(result.config):<58} "
            f"{result.default_time_s * 1e6:>7.1f}us {result.time_s * 1e6:>7.1f}us {result.speedup:>6.2f}x"
        )
        if result.rejected:
            config, reason = next(iter(result.rejected.items()))
            print(f"{'':<26} {len(result.rejected)} of {result.tried} configs rejected, e.g. {config}: {reason}")
    print(f"\n{name}: wrote {path}; the kernels read it at launch (times are of the whole op, median of do_bench).")
    return 0


def _report_dry_run(results: list[TunedKernel], pruning: Pruning | None) -> int:
    header = f"{'kernel':<26} {'shape key (small, float32)':<44} {'tilings':>7} {'failed':>6}"
    print(f"\n{header}\n{'-' * len(header)}")
    failed = 0
    for result in results:
        print(f"{result.kernel:<26} {result.key:<44} {result.tried:>7} {len(result.rejected):>6}")
        for config, reason in result.rejected.items():
            print(f"    {config}: {reason}")
        failed += len(result.rejected)
    problems = []
    if cache_dir().exists() and not cache_dir().is_dir():
        problems.append(f"cache folder {cache_dir()} is a file, not a folder; point LIGHTKV_CACHE_DIR at a folder")
    for path in sorted(cache_dir().glob("*.json") if cache_dir().is_dir() else []):
        try:
            read_cache(path)
            print(f"cache {path}: valid")
        except ValueError as error:
            problems.append(str(error))
    if cache_dir().is_dir() and not any(cache_dir().glob("*.json")):
        print(f"cache: no tuned configs in {cache_dir()} (the kernels launch with their defaults)")
    for problem in problems:
        print(problem)
    refused = [] if pruning is None else pruning.refused_defaults()
    ok = failed == 0 and not problems and not refused
    verdict = f"{failed} tiling(s) failed, {len(problems)} bad cache file(s), {len(refused)} default(s) refused"
    print(f"\ndry run (Triton interpreter, nothing timed): {'every tiling matches the fallback' if ok else verdict}.")
    return 0 if ok else 1
