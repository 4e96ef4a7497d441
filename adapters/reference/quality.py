"""Quality benchmark: accuracy of the shipped tiny LVLM vs vision-token retention, one line per method.

    lightkv eval [--per-type 100] [--out DIR]   # DIR: default $LIGHTKV_RESULTS_DIR, else ~/.cache/lightkv/results

How retention is measured and how each method is set to a target: ``perf/README.md``, "Quality: accuracy vs
vision-token retention".
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lightkv_adapters.reference import shapes_world as world
from lightkv_adapters.reference.tiny_lvlm import VISION_TOKENS, TinyLVLM, load_weights_option
from lightkv_core.budget import layer_kv_lengths
from lightkv_core.cli import Command, positive_int
from lightkv_core.config import PRESET_DEPTHS, PRESETS, LightKVConfig
from lightkv_core.errors import UsageError
from lightkv_core.methods import METHODS as REGISTRY
from lightkv_core.methods import CompressionMethod, FastV, KVEviction, LightKV, RandomDrop, method_by_name
from lightkv_core.methods.fastv import drop_ratio, released_layer
from lightkv_core.run_record import RESULTS_HELP, output_dir
from lightkv_core.stage import lightkv_stage

HELD_OUT_SEED_BASE = 500_000
RETENTIONS = (0.75, 0.55, 0.35, 0.25, 0.15)
TOLERANCE = 0.01
METHODS = (
    "lightkv", "lightkv-compact", "lightkv-prompt", "lightkv-unguided", "fastv", "random-fastv", "random",
    "prefixkv", "aircache", "lookm",
)  # fmt: skip
_VARIANTS = {
    "lightkv": {},
    "lightkv-compact": {"positions": "compact"},
    "lightkv-prompt": {"guide": "prompt"},
    "lightkv-unguided": {"guide": "none"},
}


def held_out(per_type: int) -> list[tuple[world.Example, world.Question]]:
    """The fixed held-out set: ``per_type`` questions of every type, from seeds ``HELD_OUT_SEED_BASE`` on."""
    pairs: dict[str, list] = {kind: [] for kind in world.QUESTION_TYPES}
    seed = HELD_OUT_SEED_BASE
    while any(len(v) < per_type for v in pairs.values()):
        example = world.make_example(seed)
        for question in example.questions:
            if len(pairs[question.kind]) < per_type:
                pairs[question.kind].append((example, question))
        seed += 1
    return [pair for kind in world.QUESTION_TYPES for pair in pairs[kind]]


def planned_retention(config: LightKVConfig, num_layers: int, grid: tuple[int, int]) -> float:
    """Vision retention of ``config`` on one image of ``grid`` tokens, from the stage's own planning
    (run on random states; the counts depend only on the grid when windows nest, as on 16 x 16)."""
    rows, cols = grid
    tokens = rows * cols
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, tokens + 2, 8, generator=generator)
    qk = torch.randn(1, 1, tokens + 2, 8, generator=generator)
    spans = [(1, tokens + 1, rows, cols)]
    counts = [tokens]
    for layer in config.merge_layers:
        window, ratio = config.stage_at(layer)
        out = lightkv_stage(hidden, qk, qk, spans, window, ratio, guide="none", backend="torch")
        hidden, spans = out.hidden, out.spans
        qk = torch.randn(1, 1, hidden.shape[1], 8, generator=generator)
        counts.append(spans[0].length)
    per_layer = layer_kv_lengths(config.merge_layers, counts, num_layers)
    return sum(per_layer) / (tokens * num_layers)


def lightkv_schedule(num_layers: int, target: float, grid: tuple[int, int], **options: str) -> LightKVConfig | None:
    """The LightKV schedule for a retention ``target``, or ``None`` where it is out of reach.

    The released LLaVA schedule scaled to ``num_layers``, with one ratio for every stage: the smallest in
    [0, 0.5] whose planned retention is within ``TOLERANCE`` of the target. If even 0.5 keeps too much, every
    stage moves one layer earlier (staying distinct and >= 0); once the stages sit at the first layers, a stage
    with window 1 is added after the last. A target still out of reach (each stage at most halves a window,
    layer 0 always holds the full KV) gives ``None``.
    """
    base = PRESETS["llava-1.5"]
    config = replace(base, **options).scaled_to(num_layers, PRESET_DEPTHS["llava-1.5"])
    while True:
        strongest = replace(config, merge_ratios=(0.5,) * len(config.merge_layers))
        if planned_retention(strongest, num_layers, grid) <= target + TOLERANCE:
            low, high = 0.0, 0.5
            for _ in range(20):
                middle = (low + high) / 2
                trial = replace(config, merge_ratios=(middle,) * len(config.merge_layers))
                if planned_retention(trial, num_layers, grid) <= target + TOLERANCE:
                    high = middle
                else:
                    low = middle
            ratio = math.ceil(high * 1e4) / 1e4  # rounded up: more merging, so still within the target
            return replace(config, merge_ratios=(ratio,) * len(config.merge_layers))
        layers = [max(i, layer - 1) for i, layer in enumerate(config.merge_layers)]
        windows = list(config.merge_windows)
        if layers == list(config.merge_layers):
            if layers[-1] + 1 >= num_layers:
                return None
            layers.append(layers[-1] + 1)
            windows.append(1)
        config = replace(config, merge_layers=tuple(layers), merge_windows=tuple(windows),
                         merge_ratios=(0.5,) * len(layers))  # fmt: skip


def build_method(name: str, num_layers: int, target: float, grid: tuple[int, int]) -> CompressionMethod | None:
    """Method ``name`` at retention ``target``, or ``None`` if it cannot reach it."""
    if name in _VARIANTS:
        config = lightkv_schedule(num_layers, target, grid, **_VARIANTS[name])
        return None if config is None else LightKV(config)
    if name in REGISTRY and issubclass(REGISTRY[name], KVEviction):
        return method_by_name(name, num_layers, retention=target)
    layer = released_layer(num_layers)
    ratio = drop_ratio(num_layers, layer, target)
    if ratio is None:
        return None
    if name == "fastv":
        return FastV(layer, ratio)
    if name == "random-fastv":
        return RandomDrop(layer, ratio, seed=0)
    if name == "random":
        return RandomDrop(-1, drop_ratio(num_layers, -1, target), seed=0)
    raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")


@dataclass
class Score:
    accuracy: float
    per_type: dict[str, float]
    retention: float
    prefill_seconds: float


def score(
    model: TinyLVLM,
    pairs: list,
    reduction: CompressionMethod | None,
    batch: int,
    on_batch: Callable[[], object] | None = None,
) -> Score:
    """Exact-match accuracy of greedy answers on ``pairs``, with measured retention and prefill time
    (``on_batch`` is called after every batch, e.g. to move a progress bar)."""
    hits: dict[str, list[bool]] = {kind: [] for kind in world.QUESTION_TYPES}
    held, original, prefill = 0.0, 0.0, 0.0
    for start in range(0, len(pairs), batch):
        chunk = pairs[start : start + batch]
        answers, stats = model.answer([e for e, _ in chunk], [q for _, q in chunk], reduction)
        for (_, question), answer in zip(chunk, answers, strict=True):
            hits[question.kind].append(answer == question.answer)
        held += float(stats.vision_tokens.sum())
        original += float(stats.original_vision_tokens.sum()) * stats.vision_tokens.shape[0]
        prefill += stats.prefill_seconds
        if on_batch is not None:
            on_batch()
    every = [h for kind in hits.values() for h in kind]
    return Score(
        accuracy=float(np.mean(every)),
        per_type={kind: float(np.mean(v)) for kind, v in hits.items() if v},
        retention=held / original,
        prefill_seconds=prefill,
    )


def _describe(reduction: CompressionMethod | None) -> dict | None:
    if reduction is None:
        return None
    if isinstance(reduction, LightKV):
        c = reduction.config
        return {"merge_layers": list(c.merge_layers), "merge_windows": list(c.merge_windows),
                "merge_ratios": list(c.merge_ratios), "guide": c.guide, "positions": c.position_mode}  # fmt: skip
    if isinstance(reduction, KVEviction):
        return {"retention": reduction.retention}
    return {"layer": reduction.layer, "ratio": round(reduction.ratio, 4)}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, row in summary["methods"].items():
        measured = summary["measured_retention"][name]
        points = [(1.0, summary["full"])] + sorted(
            ((measured[key], acc) for key, acc in row.items() if acc is not None), reverse=True
        )
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    axis.set_xlabel("vision-token retention (mean over layers, measured)")
    axis.set_ylabel("exact-match accuracy")
    axis.set_title(f"tiny LVLM, shapes world, {summary['questions']} held-out questions")
    axis.invert_xaxis()
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    try:
        import matplotlib  # noqa: F401  (checked before the runs: the plot comes last)
    except ImportError:
        raise SystemExit("lightkv eval draws its plot with matplotlib: pip install 'lightkv[perf]'") from None
    methods = _methods(args.methods)
    retentions = _retentions(args.retentions) if args.retentions else list(RETENTIONS)
    out = output_dir(args.out)
    torch.manual_seed(0)
    model = load_weights_option(args.weights)
    num_layers = model.config.num_layers
    grid = (world.GRID, world.GRID)
    pairs = held_out(args.per_type)
    jobs = [(None, None)] + [(name, target) for name in methods for target in retentions]
    results: dict = {}
    with tqdm(jobs, desc="eval", unit="run", file=sys.stderr) as progress:
        for name, target in progress:
            progress.set_postfix_str("full" if name is None else f"{name} @ {target:.2f}")
            reduction = None if name is None else build_method(name, num_layers, target, grid)
            if name is not None and reduction is None:
                results[(name, target)] = (None, None)
                continue
            results[(name, target)] = (score(model, pairs, reduction, args.batch), reduction)
    full = results[(None, None)][0]
    summary = {
        "full": full.accuracy,
        "methods": {},
        "measured_retention": {},
        "per_type": {"full": full.per_type},
        "prefill_time_vs_full": {},
        "schedules": {},
        "questions": len(pairs),
        "question_types": list(world.QUESTION_TYPES),
        "model": {"layers": num_layers, "vision_tokens": VISION_TOKENS, "weights": str(args.weights or "shipped")},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "command": "lightkv " + " ".join(args.argv),
        "date": time.strftime("%Y-%m-%d"),
    }
    for name in methods:
        for key in ("methods", "measured_retention", "prefill_time_vs_full", "schedules"):
            summary[key][name] = {}
        summary["per_type"][name] = {}
        for target in retentions:
            key = f"{target:.2f}"
            result, reduction = results[(name, target)]
            summary["methods"][name][key] = None if result is None else result.accuracy
            summary["measured_retention"][name][key] = None if result is None else round(result.retention, 4)
            summary["per_type"][name][key] = None if result is None else result.per_type
            summary["prefill_time_vs_full"][name][key] = (
                None if result is None else round(result.prefill_seconds / full.prefill_seconds, 3)
            )
            summary["schedules"][name][key] = _describe(reduction)
    (out / "quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out / "quality.png")
    print(format_table(summary))
    print(f"\nwrote {out / 'quality.json'} and {out / 'quality.png'}")
    return 0


def _methods(text: str) -> list[str]:
    """``--methods``: every method if empty; a name not in :data:`METHODS` is a usage error."""
    methods = [name.strip() for name in text.split(",")] if text else list(METHODS)
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise UsageError(f"--methods: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(METHODS)}")
    return methods


def _retentions(text: str) -> list[float]:
    """``--retentions``: distinct retention targets in [0, 1], e.g. ``0.55,0.25``; anything else is a usage error."""
    try:
        values = [float(r) for r in text.split(",")]
    except ValueError:
        values = []
    if not values or any(not 0.0 <= r <= 1.0 for r in values):  # also refuses nan
        raise UsageError(f"--retentions: expected comma-separated numbers in [0, 1], e.g. 0.55,0.25, got {text!r}")
    if len({f"{r:.2f}" for r in values}) < len(values):
        raise UsageError(f"--retentions: the targets must differ in their first two decimals, got {text!r}")
    return values


def format_table(summary: dict) -> str:
    """Accuracy per method and retention target, with the measured retention in brackets."""
    keys = list(next(iter(summary["methods"].values())).keys()) if summary["methods"] else []
    lines = [f"full cache: {summary['full']:.3f} on {summary['questions']} questions", ""]
    lines.append(f"{'method':<18}" + "".join(f"{'R=' + k:>16}" for k in keys))
    for name, row in summary["methods"].items():
        cells = []
        for key in keys:
            acc = row[key]
            measured = summary["measured_retention"][name][key]
            cells.append(f"{'n/a':>16}" if acc is None else f"{acc:>8.3f} ({measured:.2f})")
        lines.append(f"{name:<18}" + "".join(cells))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--per-type", type=positive_int, default=100, help="held-out questions per question type")
    parser.add_argument("--methods", default="", help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--retentions", default="", help="comma-separated retention targets, e.g. 0.55,0.25")
    parser.add_argument("--batch", type=positive_int, default=100)
    parser.add_argument("--weights", default="", help="safetensors file (default: the shipped model)")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"folder for quality.json and quality.png (default {RESULTS_HELP})"
    )


# Named in pyproject.toml's lightkv.commands entry points: the core's command line finds it there.
COMMAND = Command(
    "eval", "quality benchmark: accuracy vs vision-token retention per method", add_arguments, run, order=50
)
