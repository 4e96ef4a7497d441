"""``lightkv autotune``: pick the fastest launch config of every Triton kernel for the shapes a model's LightKV
stages run, on the current GPU, and store it where the kernels read it at launch (:mod:`lightkv_core.kernels.tuning`).

A stage's shapes (:class:`StageShape`) come from a model preset: the prompt a 7B member of the family sees (its
images' grids plus ``text_tokens`` text tokens), run through the preset's released schedule, so stage ``k`` has the
sequence length and vision spans left by stages ``1..k-1``. Every kernel is timed on inputs of exactly that shape
(random values; the window structure is the stage's own), each candidate config against the default one, and a
candidate is accepted only if its output matches the PyTorch fallback's.

Without a GPU there is nothing to time: :func:`dry_run` instead runs every distinct tiling of every kernel under
the Triton interpreter on a small stage and checks it against the fallback, and checks the cache file.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from functools import partial

import torch
from tqdm import tqdm

from lightkv_core.budget import MODEL_SHAPES
from lightkv_core.compaction import merge_lists
from lightkv_core.config import PRESET_DEPTHS, PRESETS, LightKVConfig
from lightkv_core.kernels.attention_stats import attention_statistics_torch, attention_statistics_triton
from lightkv_core.kernels.launch import interpreting
from lightkv_core.kernels.merge_compact import merge_compact_torch, merge_compact_triton
from lightkv_core.kernels.scoring import cross_attention_scores_torch, cross_attention_scores_triton
from lightkv_core.kernels.tuning import (
    KERNELS,
    LAUNCH_PARAMS,
    TILED_DIMS,
    bucket,
    cache_dir,
    device_name,
    dtype_name,
    fit_tiles,
    read_cache,
    store_configs,
)
from lightkv_core.kernels.window_match import window_best_match_torch, window_best_match_triton
from lightkv_core.spans import VisionSpan
from lightkv_core.stage import lightkv_stage
from lightkv_core.windows import choose_merges, plan_windows


@dataclass(frozen=True)
class StageShape:
    """The inputs of one LightKV stage, by shape.

    Attributes:
        label: e.g. ``"llava-next stage 2 (layer 18, W=2)"``.
        seq: tokens in the sequence when the stage runs (``S``).
        guide_tokens: text tokens that guide the scoring (``T``).
        heads, kv_heads, head_dim: attention shape of ``q`` ``(1, heads, S, head_dim)`` and ``k``.
        hidden: width of the hidden states the grouping and merge kernels read (``D``).
        spans: the images' vision spans at this stage.
        window, ratio: the stage's window count per side and merge ratio.
    """

    label: str
    seq: int
    guide_tokens: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    spans: tuple[VisionSpan, ...]
    window: int
    ratio: float

    def describe(self) -> str:
        """The dimensions, e.g. ``"S=2980 T=100 H=32/32 d=128 D=4096 vision=2880 W=4"``."""
        vision = sum(span.length for span in self.spans)
        attention = f"H={self.heads}/{self.kv_heads} d={self.head_dim}"
        return f"S={self.seq} T={self.guide_tokens} {attention} D={self.hidden} vision={vision} W={self.window}"


def preset_shapes(preset: str, text_tokens: int = 100, seq: int | None = None) -> list[StageShape]:
    """The shapes of every stage of ``preset``'s released schedule on a prompt of its family.

    Args:
        preset: a key of :data:`~lightkv_core.config.PRESETS` (its 7B model shape from
            :data:`~lightkv_core.budget.MODEL_SHAPES`).
        text_tokens: text tokens in the prompt (all of them guide the scoring; 35 go before the images).
        seq: if given, the images are replaced by as many ``rows x cols`` images as fit ``seq - text_tokens``
            vision tokens (at least one), to tune for longer or shorter prompts than the preset's.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if text_tokens < 1:
        raise ValueError(f"text_tokens must be at least 1, got {text_tokens}")
    model = MODEL_SHAPES[preset]
    config: LightKVConfig = PRESETS[preset]
    rows, cols = model.grid
    images = model.images if seq is None else max(1, (seq - text_tokens) // (rows * cols))
    before = min(35, text_tokens)
    spans, position = [], before
    for _ in range(images):
        spans.append(VisionSpan(position, position + rows * cols, rows, cols))
        position += rows * cols
    length = position + text_tokens - before
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, length, 16, generator=generator)
    shapes = []
    for stage, (layer, window, ratio) in enumerate(
        zip(config.merge_layers, config.merge_windows, config.merge_ratios, strict=True), start=1
    ):
        current = hidden.shape[1]
        shapes.append(
            StageShape(
                label=f"{preset} stage {stage} (layer {layer} of {PRESET_DEPTHS[preset]}, W={window})",
                seq=current,
                guide_tokens=text_tokens,
                heads=model.heads,
                kv_heads=model.kv.kv_heads,
                head_dim=model.kv.head_dim,
                hidden=model.hidden_size,
                spans=tuple(spans),
                window=window,
                ratio=ratio,
            )
        )
        q = torch.randn(1, 2, current, 16, generator=generator)
        result = lightkv_stage(hidden, q, q, list(spans), window, ratio, layout=config.layout, backend="torch")
        hidden, spans = result.hidden, list(result.spans)
    return shapes


def parse_shape(text: str, base: StageShape) -> StageShape:
    """``base`` with fields overridden by ``text``, e.g. ``"S=2880,T=128"`` (also ``H``, ``Hk``, ``d``, ``D``,
    ``W``). ``S`` keeps as many of the base's images as fit beside ``T`` text tokens (at least one); the last ``T``
    text tokens guide."""
    fields = {"S": "seq", "T": "guide_tokens", "H": "heads", "Hk": "kv_heads", "d": "head_dim", "D": "hidden"}
    fields["W"] = "window"
    changes: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in fields or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(
                f"shape {text!r}: expected NAME=positive integer with NAME in {sorted(fields)}, got {item!r}"
            )
        changes[fields[name]] = int(value)
    if not changes:
        raise ValueError(f"shape {text!r} sets nothing")
    shape = replace(base, **changes, label=f"{base.label} [{text}]")
    first = shape.spans[0]
    size = first.rows * first.cols
    if "seq" in changes:
        images = max(1, (shape.seq - shape.guide_tokens) // size)
        spans = tuple(
            VisionSpan(first.start + i * size, first.start + (i + 1) * size, first.rows, first.cols)
            for i in range(images)
        )
        shape = replace(shape, spans=spans)
    # room for the guide tokens around the images (the sequence grows if S cannot hold one image and T)
    shape = replace(shape, seq=max(shape.seq, sum(span.length for span in shape.spans) + shape.guide_tokens))
    if shape.heads % shape.kv_heads:
        raise ValueError(f"shape {text!r}: {shape.heads} query heads are not a multiple of {shape.kv_heads} KV heads")
    return shape


# ----------------------------------------------------------------------------------------------
# One kernel on one stage's inputs


@dataclass
class KernelProblem:
    """A kernel's inputs for one stage: ``launch(config)`` runs it with a config, ``check(output)`` compares an
    output with the PyTorch fallback's (raising AssertionError with the largest difference), ``key`` is the
    cache's shape key."""

    kernel: str
    key: str
    launch: Callable[[dict[str, int]], object]
    check: Callable[[object], None]


def _guides(shape: StageShape) -> torch.Tensor:
    """Sequence positions of the last ``guide_tokens`` text tokens (positions outside the vision spans)."""
    is_text = torch.ones(shape.seq, dtype=torch.bool)
    for span in shape.spans:
        is_text[span.start : span.end] = False
    text = is_text.nonzero().squeeze(1)
    if text.numel() < shape.guide_tokens:
        raise ValueError(f"{shape.label}: {text.numel()} text tokens cannot hold {shape.guide_tokens} guide tokens")
    return text[text.numel() - shape.guide_tokens :]


def kernel_problems(
    kernels: list[str], shape: StageShape, device: torch.device, dtype: torch.dtype
) -> Iterator[KernelProblem]:
    """The problems of ``kernels`` (names of :data:`KERNELS`) on random inputs of ``shape``."""
    generator = torch.Generator().manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator).to(device=device, dtype=dtype)

    if any(name.startswith("scoring.") for name in kernels):
        q, k = randn(1, shape.heads, shape.seq, shape.head_dim), randn(1, shape.kv_heads, shape.seq, shape.head_dim)
        guides = _guides(shape)
        guide_index, guide_count = guides[None].to(device), torch.tensor([guides.numel()], device=device)
        query_mask = torch.ones(1, shape.seq, dtype=torch.bool, device=device)
        scale = 1.0 / math.sqrt(shape.head_dim)
        expected = cross_attention_scores_torch(q, k, guide_index, guide_count, query_mask, scale)
        dims = {
            "S": bucket(shape.seq),
            "T": bucket(guides.numel()),
            "H": shape.heads,
            "d": shape.head_dim,
            "dtype": dtype_name(dtype),
        }
        defaults = (
            fit_tiles(KERNELS["scoring.column_lse"].default, dims),
            fit_tiles(KERNELS["scoring.row_sum"].default, dims),
        )

        def scoring_check(output: object) -> None:
            torch.testing.assert_close(output, expected, rtol=2e-3, atol=1e-3 * shape.guide_tokens)

        inputs = (q, k, guide_index, guide_count, query_mask, scale)
        for index, name in enumerate(("scoring.column_lse", "scoring.row_sum")):
            if name in kernels:
                launch = partial(_launch_pass, cross_attention_scores_triton, inputs, defaults, index)
                yield KernelProblem(name, KERNELS[name].key(**dims), launch, scoring_check)

    if any(name.startswith("attention_stats.") for name in kernels):
        yield from _attention_problems(kernels, shape, randn, device, dtype)
    if "window_match" not in kernels and "merge_compact" not in kernels:
        return
    plan = plan_windows([list(shape.spans)], shape.seq, shape.window, shape.ratio, "default")
    x = randn(shape.seq, shape.hidden)
    a_rows, b_rows = plan.a_rows.to(device), plan.b_rows.to(device)
    a_offsets, b_offsets = plan.a_offsets.to(device), plan.b_offsets.to(device)
    if "window_match" in kernels:
        largest = int((plan.b_offsets[1:] - plan.b_offsets[:-1]).max())
        ref_best, ref_sim = window_best_match_torch(x, a_rows, a_offsets, b_rows, b_offsets)
        unit = torch.nn.functional.normalize(x.double(), dim=1)

        def match_check(output: object) -> None:
            best, sim = output
            torch.testing.assert_close(sim, ref_sim, rtol=0, atol=2e-3)
            chosen = (unit[a_rows] * unit[b_rows[best]]).sum(dim=1)
            torch.testing.assert_close(chosen.float(), ref_sim, rtol=0, atol=2e-3)

        yield KernelProblem(
            "window_match",
            KERNELS["window_match"].key(window=bucket(largest), D=shape.hidden, dtype=dtype_name(dtype)),
            lambda config: window_best_match_triton(x, a_rows, a_offsets, b_rows, b_offsets, config),
            match_check,
        )
    if "merge_compact" in kernels:
        weights = torch.rand(shape.seq, generator=generator).to(device)
        best, sim = window_best_match_torch(x, a_rows, a_offsets, b_rows, b_offsets)
        merged_into = choose_merges(plan, best, sim, 1, shape.seq)
        out_rows, src_offsets, src_rows = (t.to(device) for t in merge_lists(merged_into < 0, merged_into, "left"))
        expected_merge = merge_compact_torch(x, weights, out_rows, src_offsets, src_rows)

        def merge_check(output: object) -> None:
            torch.testing.assert_close(output, expected_merge, rtol=1e-3, atol=1e-3)

        yield KernelProblem(
            "merge_compact",
            KERNELS["merge_compact"].key(D=shape.hidden, dtype=dtype_name(dtype)),
            lambda config: merge_compact_triton(x, weights, out_rows, src_offsets, src_rows, config),
            merge_check,
        )


def _attention_problems(
    kernels: list[str],
    shape: StageShape,
    randn: Callable[..., torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
) -> Iterator[KernelProblem]:
    """The dropping baselines' statistics over the whole prompt (causal, every key reported), for the query sets
    they use: the last token (FastV, AirCache), the text tokens (LOOK-M, AirCache's window) and every token
    (PrefixKV)."""
    q, k = randn(1, shape.heads, shape.seq, shape.head_dim), randn(1, shape.kv_heads, shape.seq, shape.head_dim)
    key_index = torch.arange(shape.seq, device=device)[None]
    key_mask = torch.ones(1, shape.seq, dtype=torch.bool, device=device)
    scale = 1.0 / math.sqrt(shape.head_dim)
    query_sets = (torch.tensor([shape.seq - 1]), _guides(shape), torch.arange(shape.seq))
    for rows in query_sets:
        query_index = rows[None].to(device)
        expected = attention_statistics_torch(q, k, query_index, key_index, key_mask, True, scale)
        common = {"Q": bucket(rows.numel()), "H": shape.heads, "d": shape.head_dim, "dtype": dtype_name(dtype)}
        dims = {"row_lse": {**common, "S": bucket(shape.seq)}, "column_sum": {**common, "C": bucket(shape.seq)}}
        defaults = (
            fit_tiles(KERNELS["attention_stats.row_lse"].default, dims["row_lse"]),
            fit_tiles(KERNELS["attention_stats.column_sum"].default, dims["column_sum"]),
        )

        tolerance = {"rtol": 2e-3, "atol": 1e-4 * max(1.0, float(expected.max()))}
        check = partial(torch.testing.assert_close, expected=expected, **tolerance)
        inputs = (q, k, query_index, key_index, key_mask, True, scale)
        for index, part in enumerate(("row_lse", "column_sum")):
            name = f"attention_stats.{part}"
            if name in kernels:
                launch = partial(_launch_pass, attention_statistics_triton, inputs, defaults, index)
                yield KernelProblem(name, KERNELS[name].key(**dims[part]), launch, check)


def _launch_pass(
    launcher: Callable[..., object],
    inputs: tuple,
    defaults: tuple[dict[str, int], dict[str, int]],
    index: int,
    config: dict[str, int],
) -> object:
    """``launcher(*inputs, configs)`` of a two-pass op with ``config`` for pass ``index`` and the other pass at
    its default."""
    configs = (config, defaults[1]) if index == 0 else (defaults[0], config)
    return launcher(*inputs, configs)


# ----------------------------------------------------------------------------------------------
# Candidates, timing, dry run


def candidates(kernel: str, key: str, max_configs: int | None = None) -> list[dict[str, int]]:
    """The configs worth timing for a shape key: the default as it launches untuned (tiles clamped to the shape)
    first, then every config whose tiles, query chunk and head block are no larger than the (bucketed) dimension
    they split; at most ``max_configs`` (a seeded sample of the rest)."""
    spec = KERNELS[kernel]
    dims = dict(item.split("=") for item in key.split(","))
    limits = {**TILED_DIMS, "SPLIT_S": "S", "HEADS_PER_PROGRAM": "H"}
    default = fit_tiles(spec.default, dims)
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


def small_shape(shape: StageShape) -> StageShape:
    """A stage small enough for the Triton interpreter with the same structure: 5 text tokens, one 16x16 image,
    16 text tokens (277 tokens: more than the smallest ``SPLIT_S``, so the scoring's query chunks are combined);
    4 query heads over 2 KV heads of 32; hidden width 48; the stage's window, at most 2."""
    return replace(
        shape,
        label=f"{shape.label} [small]",
        seq=277,
        guide_tokens=21,
        heads=4,
        kv_heads=2,
        head_dim=32,
        hidden=48,
        spans=(VisionSpan(5, 261, 16, 16),),
        window=min(shape.window, 2),
    )


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
    progress: Callable[[str], None],
) -> list[TunedKernel]:
    """Time every candidate config of each job's kernels on its shape (CUDA); a config that fails to compile or
    launch, or whose output differs from the fallback's, is rejected with the reason."""
    from triton.testing import do_bench

    results: dict[tuple[str, str], TunedKernel] = {}
    for kernels, shape in jobs:
        for problem in kernel_problems(kernels, shape, device, dtype):
            if (problem.kernel, problem.key) in results:
                continue  # an earlier stage had the same bucketed shape
            configs = candidates(problem.kernel, problem.key, max_configs)
            times: dict[int, float] = {}
            rejected: dict[str, str] = {}
            for index, config in enumerate(configs):
                progress(f"{problem.kernel} [{problem.key}] config {index + 1}/{len(configs)}")
                try:
                    problem.check(problem.launch(config))
                    torch.cuda.synchronize(device)
                    times[index] = do_bench(partial(problem.launch, config), warmup=10, rep=50) / 1e3
                except Exception as error:  # any compile/launch/check failure rejects the config
                    rejected[_config_text(config)] = _reason(error)
            if 0 not in times:
                raise RuntimeError(f"{problem.kernel} [{problem.key}]: the default config failed: {rejected}")
            best = min(times, key=times.__getitem__)
            results[(problem.kernel, problem.key)] = TunedKernel(
                problem.kernel, problem.key, shape.label, configs[best], times[best], times[0], len(configs), rejected
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
                    rejected[_config_text(config)] = _reason(error)
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


def _config_text(config: dict[str, int]) -> str:
    return " ".join(f"{param}={value}" for param, value in config.items())


def _reason(error: Exception) -> str:
    """Why a config was rejected: the error's type and the first line of its message."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:120] if lines else ''}"


# ----------------------------------------------------------------------------------------------
# The command


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
        help="tune for this shape instead, e.g. S=2880,T=128 (also H, Hk, d, D, W; the rest from the preset's "
        "first stage); repeatable",
    )
    parser.add_argument("--text-tokens", type=int, default=100, help="text tokens of the preset's prompt (default 100)")
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


def run(args: argparse.Namespace) -> int:
    """``lightkv autotune``: 0 when configs were tuned (or all checked, with ``--dry-run``), 1 otherwise."""
    kernels = list(KERNELS) if not args.kernels else [name.strip() for name in args.kernels.split(",")]
    unknown = [name for name in kernels if name not in KERNELS]
    if unknown:
        raise ValueError(f"unknown kernel(s) {unknown}; choose from {list(KERNELS)}")
    if args.max_configs < 1:
        raise ValueError(f"--max-configs must be at least 1, got {args.max_configs}")
    if args.dry_run and not interpreting():
        # Triton decides at import whether kernels are interpreted: run again with the interpreter on.
        os.execve(
            sys.executable,
            [sys.executable, "-m", "lightkv_core.cli", *args.argv],
            {**os.environ, "TRITON_INTERPRET": "1"},
        )
    if not args.dry_run and (not torch.cuda.is_available() or interpreting()):
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
    base = preset_shapes(args.preset, args.text_tokens)
    shapes = [parse_shape(text, base[0]) for text in args.shape] if args.shape else base
    # The dropping baselines' statistics run on the whole prompt: with a preset, on the first stage's shape only.
    stage_kernels = [name for name in kernels if not name.startswith("attention_stats.")]
    prompt_kernels = [name for name in kernels if name.startswith("attention_stats.")]
    jobs = [(stage_kernels, shape) for shape in shapes if stage_kernels]
    jobs += [(prompt_kernels, shape) for shape in (shapes if args.shape else shapes[:1]) if prompt_kernels]
    print(f"lightkv autotune: {len(kernels)} kernel(s) over {len(shapes)} shape(s):")
    for shape in shapes:
        print(f"  {shape.label}: {shape.describe()}")
    with tqdm(desc="autotune", unit="run", file=sys.stderr, dynamic_ncols=True) as bar:

        def progress(message: str) -> None:
            bar.set_postfix_str(message, refresh=False)
            bar.update(1)

        if args.dry_run:
            results = dry_run(jobs, progress)
        else:
            device = torch.device("cuda", torch.cuda.current_device())
            dtype = getattr(torch, args.dtype)
            results = tune(jobs, device, dtype, args.max_configs, progress)
    return _report_dry_run(results) if args.dry_run else _report_tuning(results, device)


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
            f"{result.kernel:<26} {result.key:<42} {_config_text(result.config):<58} "
            f"{result.default_time_s * 1e6:>7.1f}us {result.time_s * 1e6:>7.1f}us {result.speedup:>6.2f}x"
        )
        if result.rejected:
            config, reason = next(iter(result.rejected.items()))
            print(f"{'':<26} {len(result.rejected)} of {result.tried} configs rejected, e.g. {config}: {reason}")
    print(f"\n{name}: wrote {path}; the kernels read it at launch (times are of the whole op, median of do_bench).")
    return 0


def _report_dry_run(results: list[TunedKernel]) -> int:
    header = f"{'kernel':<26} {'shape key (small, float32)':<44} {'tilings':>7} {'failed':>6}"
    print(f"\n{header}\n{'-' * len(header)}")
    failed = 0
    for result in results:
        print(f"{result.kernel:<26} {result.key:<44} {result.tried:>7} {len(result.rejected):>6}")
        for config, reason in result.rejected.items():
            print(f"    {config}: {reason}")
        failed += len(result.rejected)
    problems = []
    for path in sorted(cache_dir().glob("*.json")):
        try:
            read_cache(path)
            print(f"cache {path}: valid")
        except ValueError as error:
            problems.append(str(error))
    if not any(cache_dir().glob("*.json")):
        print(f"cache: no tuned configs in {cache_dir()} (the kernels launch with their defaults)")
    for problem in problems:
        print(problem)
    ok = failed == 0 and not problems
    print(
        "\ndry run (Triton interpreter, nothing timed): "
        + (
            "every tiling matches the PyTorch fallback."
            if ok
            else f"{failed} tiling(s) failed, {len(problems)} bad cache file(s)."
        )
    )
    return 0 if ok else 1
