"""Grouping (window matching) and merge + compaction kernels against plain PyTorch, side by side in one run.

Every kernel is timed on the very inputs a LightKV stage hands it: ``lightkv_stage`` runs once per stage on random
hidden states of width 4096 (a 7B model) and its calls of ``window_best_match`` and ``merge_compact`` are recorded.
The prompts are LLaVA-1.5's (35 text tokens, one 24x24 image, a 24-token question: 635 tokens) and LLaVA-NeXT's
(35, five 24x24 images, 100: 3,015 tokens), batch 1, under the released schedule: windows 4, 2, 1 with ratio 0.5,
each stage on the survivors of the one before. float16 on a GPU, float32 on a CPU.

Implementations of each kernel:

- ``triton``: the library's Triton kernel, timed only where it runs natively (a CUDA GPU), never interpreted;
- ``torch``: the library's PyTorch fallback (``backend="torch"``), the baseline of every ratio;
- ``plain``: PyTorch as released token-merging (ToMe-style) code writes it. Grouping: per image, L2-normalise the
  A and B features, one dense ``A @ B.T`` over the whole image, ``-inf`` where the pair crosses a window,
  ``max(dim=-1)``. Merge: weight every row, ``index_add`` the merged A rows into their B rows over the full
  sequence, then a boolean-mask gather of the kept rows (no CSR).

Before timing, every implementation's output is checked against the fallback's (best-match similarities within a
tolerance, so that ties may pick either token; merged rows ``allclose``), so no ratio compares wrong code.

    .venv/bin/python -m lightkv_perf.kernels              # 25 rounds: about 20 s on a CPU
    .venv/bin/python -m lightkv_perf.kernels --quick      # 5 rounds: about 10 s
    .venv/bin/python -m lightkv_perf.kernels --threads 1  # one CPU thread

Where other work shares the CPU cores, run with ``--threads 1``: with more threads than free cores the fallback's
many small per-window matmuls stall (up to 100x), which makes the ratios meaningless.

Writes ``perf/results/kernels-<device>.json`` and ``.png``. On a CPU only the ratios are meaningful.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from lightkv_core import stage as stage_module
from lightkv_core.config import PRESETS
from lightkv_core.kernels import merge_compact, window_best_match
from lightkv_core.kernels.launch import TRITON_AVAILABLE, interpreting
from lightkv_core.stage import lightkv_stage
from lightkv_perf.common import (
    add_common_arguments,
    device,
    device_tag,
    median_seconds,
    peak_extra_bytes,
    run_record,
    write_json,
)

EPS = 1e-8
HEADS, HEAD_DIM = 4, 32  # q/k of the scoring step that makes the merge weights; not timed here
KERNELS = ("window_match", "merge_compact")
IMPLS = ("triton", "torch", "plain")
# absolute tolerance on cosine similarities and relative/absolute on merged rows, by dtype
SIM_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ROW_TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}


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
    """Run ``lightkv_stage`` stage after stage on random ``(1, S, hidden)`` states and record its kernel inputs.

    Each stage gets fresh random ``q``/``k`` (``HEADS`` heads of ``HEAD_DIM``) for its merge weights and runs on the
    previous stage's output hidden states and spans. ``backend`` is the stage's (the recorded inputs do not depend
    on it).
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, prompt.tokens, hidden, generator=generator).to(dev, dtype)
    spans = prompt.spans()
    cases = []
    for stage, (window, ratio) in enumerate(zip(windows, ratios, strict=True), start=1):
        q, k = (torch.randn(1, HEADS, x.shape[1], HEAD_DIM, generator=generator).to(dev, dtype) for _ in range(2))
        with (
            mock.patch.object(stage_module, "window_best_match", wraps=window_best_match) as match,
            mock.patch.object(stage_module, "merge_compact", wraps=merge_compact) as merge,
        ):
            result = lightkv_stage(x, q, k, spans, window, ratio, backend=backend)
        if match.call_count != 1 or merge.call_count != 1:
            raise RuntimeError(
                f"{prompt.name} stage {stage}: expected one call of each kernel from lightkv_stage, "
                f"got {match.call_count} of window_best_match and {merge.call_count} of merge_compact"
            )
        cases.append(
            StageCase(prompt.name, stage, window, match.call_args.args, merge.call_args.args, result.merged_into[0])
        )
        x, spans = result.hidden, result.spans
    return cases


# ----------------------------------------------------------------------------------------------
# Plain PyTorch, as released token-merging code writes it


@dataclass
class ImageSets:
    """One image's A and B tokens: ``a_rows (NA,)``/``b_rows (NB,)`` rows of ``x`` and the window of each."""

    a_rows: torch.Tensor
    a_window: torch.Tensor
    b_rows: torch.Tensor
    b_window: torch.Tensor


def image_sets(match_args: tuple[torch.Tensor, ...], window: int) -> list[ImageSets]:
    """Split the stage's window CSR back into images (``window * window`` consecutive windows each)."""
    _, a_rows, a_offsets, b_rows, b_offsets = match_args
    per_image = window * window
    images = []
    for first in range(0, a_offsets.numel() - 1, per_image):
        sets = []
        for rows, offsets in ((a_rows, a_offsets), (b_rows, b_offsets)):
            bounds = offsets[first : first + per_image + 1]
            counts = bounds[1:] - bounds[:-1]
            sets += [
                rows[bounds[0] : bounds[-1]],
                torch.repeat_interleave(torch.arange(per_image, device=rows.device), counts),
            ]
        images.append(ImageSets(*sets))
    return images


def plain_window_match(x: torch.Tensor, images: list[ImageSets]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, a dense cosine-similarity matrix of all its A tokens against all its B tokens, masked to windows.

    Args:
        x: ``(N, D)`` hidden states.
        images: every image's A/B rows and windows, in the order of the stage's CSR.

    Returns:
        ``best (NA,)`` int64 position of the best B token among all images' B tokens concatenated, and ``sim (NA,)``
        float32 its cosine similarity; A tokens in image order.
    """
    best, sim, base = [], [], 0
    for image in images:
        a, b = x[image.a_rows], x[image.b_rows]
        a = a / a.norm(dim=-1, keepdim=True)
        b = b / b.norm(dim=-1, keepdim=True)
        scores = a @ b.T
        scores.masked_fill_(image.a_window[:, None] != image.b_window[None, :], float("-inf"))
        values, index = scores.max(dim=-1)
        best.append(index + base)
        sim.append(values.float())
        base += image.b_rows.numel()
    return torch.cat(best), torch.cat(sim)


def plain_merge(
    x: torch.Tensor, weights: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """Weighted merge over the full sequence, then a boolean-mask gather of the kept rows.

    Args:
        x: ``(N, D)`` rows.
        weights: ``(N,)`` float32 merge weights.
        sources: ``(R,)`` int64 rows that merge away; ``targets``: ``(R,)`` the row each merges into.
        keep: ``(N,)`` bool rows that survive.

    Returns:
        ``(keep.sum(), D)`` in ``x``'s dtype: receiving rows averaged with their sources, the others unchanged.
    """
    acc = x.float() * weights[:, None]
    acc.index_add_(0, targets, acc[sources])
    total = weights.index_add(0, targets, weights[sources])
    merged = (acc / total.clamp(min=EPS)[:, None]).to(x.dtype)
    receives = torch.zeros_like(keep).index_fill_(0, targets, True)
    return torch.where(receives[:, None], merged, x)[keep]


def plain_merge_args(case: StageCase) -> tuple[torch.Tensor, ...]:
    """``(x, weights, sources, targets, keep)`` for :func:`plain_merge`, from the stage's ``merged_into``."""
    x, weights = case.merge_args[:2]
    merged_into = case.merged_into
    sources = (merged_into >= 0).nonzero().squeeze(1)
    return x, weights, sources, merged_into[sources], merged_into < 0


# ----------------------------------------------------------------------------------------------
# Correctness checks against the fallback


def check_window_match(
    match_args: tuple[torch.Tensor, ...], result: tuple[torch.Tensor, torch.Tensor], reference: tuple, name: str
) -> int:
    """Check ``result = (best, sim)`` against the fallback's ``reference``; returns how many ``best`` differ (ties).

    A best match must lie in its A token's window, its similarity must equal the fallback's maximum within the
    dtype's tolerance, and so must the cosine of the pair it names (recomputed in float64).

    Raises:
        RuntimeError: naming ``name`` and what disagrees.
    """
    x, a_rows, a_offsets, b_rows, b_offsets = match_args
    best, sim = result
    ref_best, ref_sim = reference
    tolerance = SIM_TOLERANCE[x.dtype]
    if best.shape != ref_best.shape or sim.shape != ref_sim.shape:
        raise RuntimeError(f"{name}: shapes {tuple(best.shape)}, {tuple(sim.shape)} instead of {tuple(ref_best.shape)}")
    windows = a_offsets.numel() - 1
    a_window = torch.repeat_interleave(torch.arange(windows, device=x.device), a_offsets[1:] - a_offsets[:-1])
    b_window = torch.repeat_interleave(torch.arange(windows, device=x.device), b_offsets[1:] - b_offsets[:-1])
    if not bool((b_window[best] == a_window).all()):
        raise RuntimeError(f"{name}: a best match lies outside its A token's window")
    a, b = x[a_rows].double(), x[b_rows[best]].double()
    cosine = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)
    for label, values in (("similarity", sim.double()), ("cosine of the chosen pair", cosine)):
        error = float((values - ref_sim.double()).abs().max())
        if not error <= tolerance:
            raise RuntimeError(f"{name}: {label} off the fallback's best by {error:.3g} (tolerance {tolerance})")
    return int((best != ref_best).sum())


def check_merge(out: torch.Tensor, reference: torch.Tensor, name: str) -> float:
    """Check merged rows ``out`` against the fallback's ``reference`` (``allclose``); returns the largest difference.

    Raises:
        RuntimeError: naming ``name`` and the difference.
    """
    if out.shape != reference.shape or out.dtype != reference.dtype:
        raise RuntimeError(
            f"{name}: {tuple(out.shape)} {out.dtype} instead of {tuple(reference.shape)} {reference.dtype}"
        )
    rtol, atol = ROW_TOLERANCE[reference.dtype]
    error = float((out.float() - reference.float()).abs().max()) if out.numel() else 0.0
    if not torch.allclose(out.float(), reference.float(), rtol=rtol, atol=atol):
        raise RuntimeError(f"{name}: merged rows differ from the fallback's by up to {error:.3g}")
    return error


# ----------------------------------------------------------------------------------------------
# Timing


def kernel_bytes(kernel: str, case: StageCase) -> int:
    """Bytes a kernel reads and writes if it touches everything once: the feature rows it needs, its index and
    weight entries and its outputs (for the achieved bandwidth)."""
    if kernel == "window_match":
        x, a_rows, a_offsets, b_rows, b_offsets = case.match_args
        features = (a_rows.numel() + b_rows.numel()) * x.shape[1] * x.element_size()
        index = sum(t.numel() * t.element_size() for t in (a_rows, a_offsets, b_rows, b_offsets))
        return features + index + a_rows.numel() * (8 + 4)  # best (int64) and sim (float32)
    x, weights, out_rows, src_offsets, src_rows = case.merge_args
    row = x.shape[1] * x.element_size()
    receivers = int((src_offsets[1:] > src_offsets[:-1]).sum())
    read = (int((out_rows >= 0).sum()) + src_rows.numel()) * row + (receivers + src_rows.numel()) * 4
    index = sum(t.numel() * t.element_size() for t in (out_rows, src_offsets, src_rows))
    return read + index + out_rows.numel() * row


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
    plain_args = plain_merge_args(case)
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
            checked[impl] = {"index_mismatches": check_window_match(case.match_args, fn(), reference, name)}
        else:
            checked[impl] = {"max_abs_diff": check_merge(fn(), reference, name)}
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
        "bytes_once": kernel_bytes(kernel, case),
        "checked_against_torch": checked,
    }
    return rows, summary


def ratios(rows: list[dict]) -> list[dict]:
    """For every (kernel, prompt, stage): each implementation's time over the fallback's, and triton over plain."""
    groups: dict[tuple, dict[str, float]] = {}
    for row in rows:
        groups.setdefault((row["kernel"], row["prompt"], row["stage"]), {})[row["impl"]] = row["time_s"]
    result = []
    for (kernel, prompt, stage), times in groups.items():
        entry = {
            "kernel": kernel,
            "prompt": prompt,
            "stage": stage,
            "vs_torch": {impl: round(t / times["torch"], 4) for impl, t in times.items()},
        }
        if "triton" in times:
            entry["triton_vs_plain"] = round(times["triton"] / times["plain"], 4)
        result.append(entry)
    return result


def bandwidth(rows: list[dict], cases: list[dict]) -> list[dict]:
    """Achieved bandwidth of the Triton rows: ``bytes_once`` of the case over the time, in GB/s."""
    once = {(c["kernel"], c["prompt"], c["stage"]): c["bytes_once"] for c in cases}
    return [
        {
            "kernel": row["kernel"],
            "prompt": row["prompt"],
            "stage": row["stage"],
            "bytes": once[(row["kernel"], row["prompt"], row["stage"])],
            "gb_per_s": round(once[(row["kernel"], row["prompt"], row["stage"])] / row["time_s"] / 1e9, 1),
        }
        for row in rows
        if row["impl"] == "triton"
    ]


# ----------------------------------------------------------------------------------------------
# Output


def plot(result: dict, path: Path) -> None:
    """Bars of each implementation's time relative to the fallback, per prompt and stage, one panel per kernel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    figure, axes = plt.subplots(1, len(KERNELS), figsize=(7 * len(KERNELS), 4.5), squeeze=False)
    windows = {(c["prompt"], c["stage"]): c["window"] for c in result["cases"]}
    for ax, kernel in zip(axes[0], KERNELS, strict=True):
        entries = [r for r in result["ratios"] if r["kernel"] == kernel]
        impls = [impl for impl in IMPLS if any(impl in r["vs_torch"] for r in entries)]
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            xs = [j + (i - (len(impls) - 1) / 2) * width for j in range(len(entries))]
            values = [r["vs_torch"].get(impl, float("nan")) for r in entries]
            bars = ax.bar(xs, values, width=width, label=impl)
            ax.bar_label(bars, labels=[f"{v:.2g}" for v in values], fontsize=7)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.set_xticks(range(len(entries)))
        ax.set_xticklabels(
            [f"{r['prompt']}\nstage {r['stage']}, W={windows[(r['prompt'], r['stage'])]}" for r in entries], fontsize=7
        )
        ax.set(ylabel="time / PyTorch fallback (log scale)", title=kernel)
        ax.legend(fontsize=8)
    figure.suptitle(f"LightKV kernels, D={result['hidden']} {result['dtype']}, {result['machine']['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def print_table(result: dict) -> None:
    vs_torch = {(r["kernel"], r["prompt"], r["stage"]): r["vs_torch"] for r in result["ratios"]}
    header = f"{'kernel':<14}{'prompt':<12}{'stage':>6}{'W':>3}{'tokens':>8}  {'impl':<7}{'ms':>10}{'x torch':>9}"
    print(header + f"{'peak MiB':>10}")
    for row in result["rows"]:
        ratio = vs_torch[(row["kernel"], row["prompt"], row["stage"])][row["impl"]]
        print(
            f"{row['kernel']:<14}{row['prompt']:<12}{row['stage']:>6}{row['window']:>3}{row['tokens']:>8}  "
            f"{row['impl']:<7}{row['time_s'] * 1e3:>10.3f}{ratio:>9.3f}{row['peak_bytes'] / 2**20:>10.2f}"
        )
    for skipped in result["skipped"]:
        print(f"skipped {skipped['impl']}: {skipped['reason']}")
    if "timing_note" in result:
        print(result["timing_note"])


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
    dev = device()
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
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
    path = write_json(result, args.out / f"kernels-{device_tag()}.json")
    plot(result, path.with_suffix(".png"))
    print_table(result)
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
