"""One kernel on one stage's inputs, for autotune and the compile check: a launch with any config, and the check
of its output against the PyTorch fallback (:mod:`lightkv_core.kernels.agreement`), which runs the fallback on the
first check only (a problem that is only compiled never runs it)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache, partial

import torch

from lightkv_core.compaction import merge_arguments
from lightkv_core.kernels import agreement
from lightkv_core.kernels.attention_stats import attention_statistics_torch, attention_statistics_triton
from lightkv_core.kernels.merge_compact import merge_compact_torch, merge_compact_triton
from lightkv_core.kernels.scoring import cross_attention_scores_torch, cross_attention_scores_triton
from lightkv_core.kernels.tuning import KERNELS, bucket, default_config, dtype_name
from lightkv_core.kernels.window_match import window_best_match_torch, window_best_match_triton
from lightkv_core.stage import plan_stage
from lightkv_core.stage_shapes import StageShape, guide_positions
from lightkv_core.windows import choose_merges


@dataclass
class KernelProblem:
    """A kernel's inputs for one stage: ``launch(config)`` runs it with a config, ``check(output)`` compares an
    output with the PyTorch fallback's (raising :class:`~lightkv_core.kernels.agreement.KernelMismatch`), ``key``
    is the cache's shape key."""

    kernel: str
    key: str
    launch: Callable[[dict[str, int]], object]
    check: Callable[[object], object]


def _checker(
    check: Callable[..., object], reference: Callable[[], object], *args: object, **context: object
) -> Callable[[object], object]:
    """``output -> check(*args, output, expected=reference(), **context)``, ``reference()`` computed on the first
    call and kept."""
    expected = cache(reference)
    return lambda output: check(*args, output, expected=expected(), **context)


def kernel_problems(
    kernels: list[str], shape: StageShape, device: torch.device, dtype: torch.dtype
) -> Iterator[KernelProblem]:
    """The problems of ``kernels`` (names of :data:`~lightkv_core.kernels.tuning.KERNELS`) on random inputs of
    ``shape``."""
    generator = torch.Generator().manual_seed(0)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator).to(device=device, dtype=dtype)

    if any(name.startswith("scoring.") for name in kernels):
        yield from _scoring_problems(kernels, shape, randn, device, dtype)
    if any(name.startswith("attention_stats.") for name in kernels):
        yield from _attention_problems(kernels, shape, randn, device, dtype)
    if "window_match" in kernels or "merge_compact" in kernels:
        yield from _stage_problems(kernels, shape, randn, generator, device, dtype)


def _scoring_problems(
    kernels: list[str],
    shape: StageShape,
    randn: Callable[..., torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
) -> Iterator[KernelProblem]:
    """The scoring's two passes, guided by the shape's last ``guide_tokens`` text tokens."""
    q, k = randn(1, shape.heads, shape.seq, shape.head_dim), randn(1, shape.kv_heads, shape.seq, shape.head_dim)
    guides = guide_positions(shape)
    guide_index, guide_count = guides[None].to(device), torch.tensor([guides.numel()], device=device)
    query_mask = torch.ones(1, shape.seq, dtype=torch.bool, device=device)
    scale = 1.0 / math.sqrt(shape.head_dim)
    reference = partial(cross_attention_scores_torch, q, k, guide_index, guide_count, query_mask, scale)
    dims = {
        "S": bucket(shape.seq),
        "T": bucket(guides.numel()),
        "H": shape.heads,
        "d": shape.head_dim,
        "dtype": dtype_name(dtype),
    }
    defaults = (default_config("scoring.column_lse", dims), default_config("scoring.row_sum", dims))
    check = _checker(agreement.check_scores, reference, q=q, k=k, scale=scale, guides=guides.numel())
    inputs = (q, k, guide_index, guide_count, query_mask, scale)
    for index, name in enumerate(("scoring.column_lse", "scoring.row_sum")):
        if name in kernels:
            launch = partial(_launch_pass, cross_attention_scores_triton, inputs, defaults, index)
            yield KernelProblem(name, KERNELS[name].key(**dims), launch, check)


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
    query_sets = (torch.tensor([shape.seq - 1]), guide_positions(shape), torch.arange(shape.seq))
    for rows in query_sets:
        query_index = rows[None].to(device)
        reference = partial(attention_statistics_torch, q, k, query_index, key_index, key_mask, True, scale)
        common = {"Q": bucket(rows.numel()), "H": shape.heads, "d": shape.head_dim, "dtype": dtype_name(dtype)}
        dims = {"row_lse": {**common, "S": bucket(shape.seq)}, "column_sum": {**common, "C": bucket(shape.seq)}}
        defaults = (
            default_config("attention_stats.row_lse", dims["row_lse"]),
            default_config("attention_stats.column_sum", dims["column_sum"]),
        )
        check = _checker(agreement.check_attention_statistics, reference, q=q, k=k, scale=scale, queries=rows.numel())
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


def _stage_problems(
    kernels: list[str],
    shape: StageShape,
    randn: Callable[..., torch.Tensor],
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> Iterator[KernelProblem]:
    """Window matching and merge + compaction on the arguments the stage plans for the shape's images (merge
    weights random, merges chosen from the fallback's matches, outputs left-padded)."""
    hidden = randn(1, shape.seq, shape.hidden)
    q = randn(1, 1, shape.seq, 16)
    plan = plan_stage(hidden, q, q, list(shape.spans), shape.window, shape.ratio)
    match_arguments = plan.match_arguments
    if match_arguments is None:
        raise ValueError(f"{shape.label}: the stage merges nothing, so there is nothing to tune")
    expected_match = cache(partial(window_best_match_torch, *match_arguments))
    if "window_match" in kernels:
        offsets = plan.windows.b_offsets
        largest = int((offsets[1:] - offsets[:-1]).max())
        yield KernelProblem(
            "window_match",
            KERNELS["window_match"].key(window=bucket(largest), D=shape.hidden, dtype=dtype_name(dtype)),
            lambda config: window_best_match_triton(*match_arguments, config),
            _checker(agreement.check_window_match, expected_match, match_arguments),
        )
    if "merge_compact" in kernels:
        weights = torch.rand(shape.seq, generator=generator).to(device)
        merged_into = choose_merges(plan.windows, *expected_match(), 1, shape.seq)
        merge_args = merge_arguments(hidden, merged_into < 0, merged_into, weights[None], "left")
        yield KernelProblem(
            "merge_compact",
            KERNELS["merge_compact"].key(D=shape.hidden, dtype=dtype_name(dtype)),
            lambda config: merge_compact_triton(*merge_args, config),
            _checker(agreement.check_merge, partial(merge_compact_torch, *merge_args), src_offsets=merge_args[3]),
        )
