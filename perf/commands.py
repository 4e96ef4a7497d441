"""``lightkv bench {scoring,kernels,prefill,all}``: this package's benchmarks as a ``lightkv`` subcommand (``all``
ends with the three speed targets judged from its results, :func:`lightkv_perf.roofline.targets`).

pyproject.toml names :data:`BENCH` in the ``lightkv.commands`` entry-point group, where the core's command line
finds it; the core never imports this package.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from lightkv_core.cli import Command
from lightkv_core.errors import UsageError
from lightkv_perf import kernels, prefill, roofline, scoring
from lightkv_perf.common import RESULTS_HELP, device_tag, output_dir

BENCHMARKS = {"scoring": scoring, "kernels": kernels, "prefill": prefill}


def _at_least(args: argparse.Namespace, option: str, minimum: int) -> None:
    value = getattr(args, option.removeprefix("--").replace("-", "_"))
    if value is not None and value < minimum:
        raise UsageError(f"{option} must be at least {minimum}, got {value}")


def _check_scoring(args: argparse.Namespace) -> None:
    _at_least(args, "--repeats", 1)
    _at_least(args, "--heads", 1)
    _at_least(args, "--head-dim", 1)


def _check_kernels(args: argparse.Namespace) -> None:
    _at_least(args, "--repeats", 1)
    _at_least(args, "--hidden", 1)
    _at_least(args, "--threads", 0)
    cores = os.cpu_count() or 1
    if args.threads > cores:  # more threads than cores only stalls, and a huge count crashes PyTorch
        raise UsageError(f"--threads must be at most {cores}, the CPU cores of this machine, got {args.threads}")


def _check_prefill(args: argparse.Namespace) -> None:
    _at_least(args, "--repeats", 1)
    prefill.parse_options(args)


# The option values each benchmark would only refuse deep inside, or with a plain ValueError: refused here, where
# the command line is read, as usage errors.
CHECKS: dict[str, Callable[[argparse.Namespace], None]] = {
    "scoring": _check_scoring,
    "kernels": _check_kernels,
    "prefill": _check_prefill,
}


def _run_one(name: str, args: argparse.Namespace) -> int:
    CHECKS[name](args)
    return BENCHMARKS[name].run(args)


def add_arguments(bench: argparse.ArgumentParser) -> None:
    which = bench.add_subparsers(dest="benchmark", required=True)
    for name, module in BENCHMARKS.items():
        module.add_arguments(which.add_parser(name, help=module.__doc__.splitlines()[0]))
    every = which.add_parser(
        "all", help="the three benchmarks in turn, with their default shapes, then the speed targets they judge"
    )
    every.add_argument("--quick", action="store_true", help="each benchmark's quick mode (the README's CPU run)")
    every.add_argument(
        "--out", type=Path, default=None, help=f"folder for the JSON and PNG results (default {RESULTS_HELP})"
    )


def run(args: argparse.Namespace) -> int:
    if args.benchmark != "all":
        return _run_one(args.benchmark, args)
    out = output_dir(args.out)
    for name, module in BENCHMARKS.items():
        print(f"\n=== lightkv bench {name}{' --quick' if args.quick else ''} ===", flush=True)
        parser = argparse.ArgumentParser(prog=f"lightkv bench {name}")
        module.add_arguments(parser)
        status = _run_one(name, parser.parse_args(["--quick"] * args.quick + ["--out", str(out)]))
        if status:
            return status
    print_targets(out)
    return 0


def print_targets(out: Path) -> None:
    """The project's three speed targets, judged from the scoring and prefill results just written to ``out``
    (``N/A`` with the reason where they cannot be judged, e.g. on a CPU)."""
    print("\n=== speed targets (perf/roofline.py) ===")
    roofline.print_targets([out / f"{name}-{device_tag()}.json" for name in ("scoring", "prefill")])


BENCH = Command(
    "bench",
    "benchmarks: scoring kernel, grouping/merge kernels, end-to-end prefill",
    add_arguments,
    run,
    order=60,
)
