"""Grouping (window matching) and merge + compaction kernels against plain PyTorch, side by side in one run.

Each kernel runs on the very inputs a LightKV stage hands it (:func:`build_cases`): ``triton`` (GPU only), the
``torch`` fallback (every ratio's baseline) and ``plain`` (:mod:`lightkv_perf.kernels_plain`). Prompts, checks,
commands and recorded results: ``perf/README.md``, "Grouping and merge kernels".

    .venv/bin/python -m lightkv_perf.kernels --threads 1  # where other work shares the CPU cores
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lightkv_core.compaction import merge_arguments
from lightkv_core.config import PRESETS
from lightkv_core.kernels import agreement, cross_attention_scores, merge_compact, window_best_match
from lightkv_core.kernels.launch import TRITON_AVAILABLE, interpreting
from lightkv_core.kernels.tuning import bucket, dtype_name, launch_config
from lightkv_core.stage import lightkv_stage, plan_stage
from lightkv_core.windows import choose_merges
from lightkv_perf import roofline
from lightkv_perf.common import (
    add_common_arguments,
    device,
    device_tag,
    median_seconds,
    output_dir,
    peak_extra_bytes,
    run_record,
    write_json,
)
from lightkv_perf.kernels_plain import image_sets, plain_merge, plain_merge_args, plain_window_match
from lightkv_perf.kernels_report import IMPLS, KERNELS, bandwidth, plot, print_roofline, print_table, ratios

HEADS, HEAD_DIM = 4, 32  # q/k of the scoring step that makes the merge weights; not timed here
GPU_DTYPE = torch.float16  # hidden states on a GPU, and the dtype of the roofline (on a CPU too)


@dataclass(frozen=True)
class Prompt:
    """A prompt of ``text_before`` text tokens, ``images`` square images of ``grid x grid`` tokens, ``text_after``."""

    name: str
    text_before: int
    images: int
    grid: int
    text_after: int

    @property
    def vision_tokens(self) -> int:
        return self.images * self.grid * self.grid

    @property
    def tokens(self) -> int:
        return self.text_before + self.vision_tokens + self.text_after

    def spans(self) -> list[tuple[int, int, int, int]]:
        """``(start, end, rows, cols)`` of every image, back to back after the leading text."""
        size = self.grid * self.grid
        starts = [self.text_before + i * size for i in range(self.images)]
        return [(start, start + size, self.grid, self.grid) for start in starts]


PROMPTS = {
    "llava-1.5": Prompt("llava-1.5", text_before=35, images=1, grid=24, text_after=24),
    "llava-next": Prompt("llava-next", text_before=35, images=5, grid=24, text_after=100),
}


@dataclass
class StageCase:
    """The kernel inputs of one stage of one prompt (batch 1, so flat rows are sequence indices).

    Attributes:
        match_args: ``(x (N, D), a_rows, a_offsets, b_rows, b_offsets)`` as the stage passed them to
            ``window_best_match``.
        merge_args: ``(x (N, D), weights (N,), out_rows (M,), src_offsets (M + 1,), src_rows)`` as it passed them to
            ``merge_compact``.
        merged_into: ``(N,)`` int64 row every row merges into, ``-1`` where it survives (the stage's result).
    """

    prompt: str
    stage: int
    window: int
    match_args: tuple[torch.Tensor, ...]
    merge_args: tuple[torch.Tensor, ...]
    merged_into: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.match_args[0].shape[0]


def triton_skip_reason(dev: torch.device) -> str | None:
    """Why the Triton kernels are not timed on ``dev``, or ``None`` where they run natively."""
    if not TRITON_AVAILABLE:
        return "triton is not installed"
    if dev.type != "cuda":
        return "no CUDA GPU: Triton kernels run natively only there, and the interpreter is not timed"
    if interpreting():
        return "TRITON_INTERPRET=1: the interpreter is not timed"
    return None


def build_cases(
    prompt: Prompt,
    hidden: int,
    dtype: torch.dtype,
    dev: torch.device,
    windows: tuple[int, ...],
    ratios: tuple[float, ...],
    backend: str,
    seed: int = 0,
) -> list[StageCase]:
    """The kernel inputs of every stage of ``prompt`` on random ``(1, S, hidden)`` states, as ``lightkv_stage``
    plans them (:func:`~lightkv_core.stage.plan_stage`, then the merge arguments of its choice).

    Each stage gets fresh random ``q``/``k`` (``HEADS`` heads of ``HEAD_DIM``) for its merge weights and runs on the
    previous stage's output hidden states and spans. ``backend`` is the stage's (the inputs do not depend on it).

    Raises:
        RuntimeError if the planned choice is not the one ``lightkv_stage`` makes.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, prompt.tokens, hidden, generator=generator).to(dev, dtype)
    spans = prompt.spans()
    cases = []
    for stage, (window, ratio) in enumerate(zip(windows, ratios, strict=True), start=1):
        q, k = (torch.randn(1, HEADS, x.shape[1], HEAD_DIM, generator=generator).to(dev, dtype) for _ in range(2))
        plan = plan_stage(x, q, k, spans, window, ratio)
        scores = cross_attention_scores(*plan.score_arguments, backend=backend)
        best, sim = window_best_match(*plan.match_arguments, backend=backend)
        merged_into = choose_merges(plan.windows, best, sim, 1, x.shape[1])
        merge_args = merge_arguments(x, plan.real & (merged_into < 0), merged_into, scores, "right")
        result = lightkv_stage(x, q, k, spans, window, ratio, backend=backend)
        if not torch.equal(result.merged_into.cpu(), merged_into):
            raise RuntimeError(f"{prompt.name} stage {stage}: the planned merges differ from lightkv_stage's")
        cases.append(StageCase(prompt.name, stage, window, plan.match_arguments, merge_args, merged_into[0]))
        x, spans = result.hidden, result.spans
    return cases


# ----------------------------------------------------------------------------------------------
# Correctness checks against the fallback (lightkv_core.kernels.agreement), named for the error


def check_window_match(
    match_args: tuple[torch.Tensor, ...],
    result: tuple[torch.Tensor, torch.Tensor],
    reference: tuple,
    name: str,
    plain: bool = False,
) -> int:
    """:func:`~lightkv_core.kernels.agreement.check_window_match` of ``result`` against the fallback's ``reference``
    (``plain``: the ToMe-style baseline, which computes in the inputs' dtype: three roundings to it, the two
    normalised rows and the similarity); returns how many best matches differ (ties).

    Raises:
        RuntimeError: naming ``name`` and what disagrees.
    """
    rounded_to = (match_args[0].dtype, 3) if plain else (torch.float32, 1)
    try:
        return agreement.check_window_match(match_args, result, reference, *rounded_to)
    except agreement.KernelMismatch as error:
        raise RuntimeError(f"{name}: {error}") from error


def check_merge(out: torch.Tensor, reference: torch.Tensor, src_offsets: torch.Tensor, name: str) -> float:
    """:func:`~lightkv_core.kernels.agreement.check_merge` of merged rows ``out`` against the fallback's
    ``reference``; returns the largest difference.

    Raises:
        RuntimeError: naming ``name`` and the difference.
    """
    try:
        return agreement.check_merge(out, reference, src_offsets)
    except agreement.KernelMismatch as error:
        raise RuntimeError(f"{name}: {error}") from error


# ----------------------------------------------------------------------------------------------
# Timing


def roofline_cost(kernel: str, case: StageCase) -> roofline.Cost:
    """What the Triton ``kernel`` must move and compute on ``case``'s inputs in :data:`GPU_DTYPE`, with the config
    it launches with on the device of the inputs (:mod:`lightkv_perf.roofline`)."""
    x = case.match_args[0]
    if kernel == "window_match":
        _, _, a_offsets, _, b_offsets = case.match_args
        a_counts, b_counts = (offsets.diff().tolist() for offsets in (a_offsets, b_offsets))
        dims = {"window": bucket(max(b_counts)), "D": x.shape[1], "dtype": dtype_name(GPU_DTYPE)}
        config = launch_config("window_match", x.device, **dims)
        return roofline.window_match_cost(
            a_counts, b_counts, x.shape[1], GPU_DTYPE, config["BLOCK_A"], config["BLOCK_B"]
        )
    _, _, out_rows, src_offsets, src_rows = case.merge_args
    receivers = int((src_offsets.diff() > 0).sum())
    real = int((out_rows >= 0).sum())
    return roofline.merge_compact_cost(out_rows.numel(), real, receivers, src_rows.numel(), x.shape[1], GPU_DTYPE)


def interleaved_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time in seconds of every call in ``fns``, measured side by side.

    On a CPU, after one untimed call of each, ``repeats`` rounds in which every call runs once in turn, so that all
    see the same (shared, noisy) machine; the median over the rounds. On a GPU, ``median_seconds`` of each.
    """
    if device().type == "cuda":
        return {name: median_seconds(fn, repeats) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(median_seconds(fn, 1, warmup=0))
    return {name: statistics.median(values) for name, values in samples.items()}


def implementations(kernel: str, case: StageCase, run_triton: bool) -> dict[str, Callable[[], object]]:
    """The implementations of ``kernel`` on ``case``'s inputs, ``torch`` first, as zero-argument calls."""
    if kernel == "window_match":
        x = case.match_args[0]
        images = image_sets(case.match_args, case.window)
        impls = {
            "torch": lambda: window_best_match(*case.match_args, backend="torch"),
            "plain": lambda: plain_window_match(x, images),
        }
        if run_triton:
            impls["triton"] = lambda: window_best_match(*case.match_args, backend="triton")
        return impls
    plain_args = plain_merge_args(case.merge_args, case.merged_into)
    impls = {
        "torch": lambda: merge_compact(*case.merge_args, backend="torch"),
        "plain": lambda: plain_merge(*plain_args),
    }
    if run_triton:
        impls["triton"] = lambda: merge_compact(*case.merge_args, backend="triton")
    return impls


def measure(kernel: str, case: StageCase, run_triton: bool, repeats: int) -> tuple[list[dict], dict]:
    """Check, then time every implementation of ``kernel`` on ``case``: ``(rows, case summary)``."""
    impls = implementations(kernel, case, run_triton)
    reference = impls["torch"]()
    checked = {}
    for impl, fn in impls.items():
        name = f"{impl} {kernel} ({case.prompt}, stage {case.stage})"
        if kernel == "window_match":
            mismatches = check_window_match(case.match_args, fn(), reference, name, plain=impl == "plain")
            checked[impl] = {"index_mismatches": mismatches}
        else:
            checked[impl] = {"max_abs_diff": check_merge(fn(), reference, case.merge_args[3], name)}
    times = interleaved_seconds(impls, repeats)
    rows = [
        {
            "kernel": kernel,
            "prompt": case.prompt,
            "stage": case.stage,
            "window": case.window,
            "tokens": case.tokens,
            "hidden": case.match_args[0].shape[1],
            "impl": impl,
            "time_s": times[impl],
            "peak_bytes": peak_extra_bytes(impls[impl]),
        }
        for impl in IMPLS
        if impl in impls
    ]
    _, a_rows, a_offsets, b_rows, _ = case.match_args
    summary = {
        "kernel": kernel,
        "prompt": case.prompt,
        "stage": case.stage,
        "window": case.window,
        "tokens": case.tokens,
        "windows": a_offsets.numel() - 1,
        "a_tokens": a_rows.numel(),
        "b_tokens": b_rows.numel(),
        "merged": case.merge_args[4].numel(),
        "out_tokens": case.merge_args[2].numel(),
        "roofline": roofline_cost(kernel, case).record(),
        "checked_against_torch": checked,
    }
    return rows, summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="CPU: timed rounds, every implementation once per round (default 25, quick 5)",
    )
    parser.add_argument("--prompts", nargs="+", choices=sorted(PROMPTS), default=sorted(PROMPTS), help="prompts to run")
    parser.add_argument("--hidden", type=int, default=4096, help="hidden width D (default 4096, a 7B model)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU: intra-op threads (default 0: PyTorch's; use 1 where other work shares the cores, where more "
        "threads stall, the fallback's many small matmuls worst)",
    )


def run(args: argparse.Namespace) -> int:
    threads = torch.get_num_threads()
    if device().type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    out = output_dir(args.out)
    dev = device()
    dtype = GPU_DTYPE if dev.type == "cuda" else torch.float32
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 25)
    skip = triton_skip_reason(dev)
    schedule = PRESETS["llava-1.5"]
    rows, cases = [], []
    for name in args.prompts:
        stage_cases = build_cases(
            PROMPTS[name],
            args.hidden,
            dtype,
            dev,
            schedule.merge_windows,
            schedule.merge_ratios,
            backend="torch" if skip else "triton",
        )
        for case in stage_cases:
            for kernel in KERNELS:
                case_rows, summary = measure(kernel, case, skip is None, repeats)
                rows += case_rows
                cases.append(summary)
    result = {
        **run_record("kernels"),
        "device": device_tag(),
        "dtype": str(dtype).removeprefix("torch."),
        "hidden": args.hidden,
        "schedule": {"merge_windows": schedule.merge_windows, "merge_ratios": schedule.merge_ratios},
        "prompts": {
            name: {**vars(PROMPTS[name]), "tokens": PROMPTS[name].tokens, "vision_tokens": PROMPTS[name].vision_tokens}
            for name in args.prompts
        },
        "repeats": repeats if dev.type == "cpu" else "triton.testing.do_bench (median)",
        "skipped": [] if skip is None else [{"impl": "triton", "reason": skip}],
        "rows": rows,
        "ratios": ratios(rows),
        "cases": cases,
    }
    if dev.type == "cpu":
        result["timing_note"] = (
            "CPU run: absolute times are only for context; the ratios to the PyTorch fallback are what counts"
        )
    else:
        result["triton_bandwidth"] = bandwidth(rows, cases)
    path = write_json(result, out / f"kernels-{device_tag()}.json")
    plot(result, path.with_suffix(".png"))
    print_table(result)
    print_roofline(result)
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
