"""Launch configs (lightkv_core.kernels.tuning) and `lightkv autotune` (lightkv_core.autotune), on CPU.

The kernels run under the Triton interpreter; what can be checked without a GPU is that every config computes
the same result, that tuned configs reach the kernels through the cache, and that the command refuses to tune
without a GPU."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch

from lightkv_core import autotune, kernel_problems, stage_shapes
from lightkv_core.cli import main
from lightkv_core.compaction import merge_lists
from lightkv_core.config import PRESETS
from lightkv_core.errors import UsageError
from lightkv_core.kernels import agreement, scoring
from lightkv_core.kernels.scoring import cross_attention_scores_torch, cross_attention_scores_triton
from lightkv_core.kernels.tuning import (
    KERNELS,
    LAUNCH_PARAMS,
    TuningCacheError,
    TuningCacheWarning,
    bucket,
    cache_path,
    default_config,
    device_name,
    launch_config,
    read_cache,
    store_configs,
)
from lightkv_core.kernels.window_match import window_best_match_torch
from lightkv_core.plan import plan_lengths
from lightkv_core.windows import choose_merges, plan_windows

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# dry runs put CPU tensors through the Triton kernels, and `lightkv autotune --dry-run` re-executes the process
# under the interpreter unless it already runs there
needs_interpreter = pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1")
needs_triton = pytest.mark.skipif(
    not INTERPRETING and not torch.cuda.is_available(), reason="no CUDA device and TRITON_INTERPRET != 1"
)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTKV_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_every_default_lies_in_its_space_and_candidates_start_with_it():
    for name, spec in KERNELS.items():
        assert spec.check(spec.default, name) == spec.default
        configs = spec.candidates()
        assert spec.default in configs
        assert len(configs) == math.prod(len(values) for values in spec.space.values())


def test_float32_tiles_have_their_own_defaults(cache_dir):
    """The matmul-like kernels' float32 dots are IEEE, on CUDA cores: their fp16 tiles spilled, so float32 launches
    smaller ones (the compile check, tests/tools/test_compile_check.py, finds no default spilling)."""
    dims = {"S": 4096, "T": 128, "H": 32, "d": 128}
    spec = KERNELS["scoring.column_lse"]
    fp32 = launch_config("scoring.column_lse", torch.device("cpu"), **dims, dtype="float32")
    assert fp32 == {**spec.default, "BLOCK_S": 32, "num_warps": 8}
    assert launch_config("scoring.column_lse", torch.device("cpu"), **dims, dtype="bfloat16") == spec.default
    assert autotune.candidates("scoring.column_lse", spec.key(**dims, dtype="float32"))[0] == fp32
    with pytest.raises(ValueError, match="BLOCK_S=48 is not in its space"):
        dataclasses.replace(spec, dtype_defaults={"float32": {"BLOCK_S": 48}})
    with pytest.raises(ValueError, match="dtype defaults for"):
        dataclasses.replace(spec, dtype_defaults={"float64": {"BLOCK_S": 32}})


def test_candidates_prune_tiles_larger_than_the_shape_and_cap_the_count():
    key = KERNELS["scoring.column_lse"].key(S=512, T=32, H=32, d=128, dtype="float16")
    configs = autotune.candidates("scoring.column_lse", key)
    assert configs[0] == KERNELS["scoring.column_lse"].default
    assert all(c["BLOCK_T"] <= 32 and c["SPLIT_S"] <= 512 for c in configs)
    assert {c["BLOCK_T"] for c in configs} == {16, 32}
    capped = autotune.candidates("scoring.column_lse", key, max_configs=5)
    assert len(capped) == 5 and capped[0] == KERNELS["scoring.column_lse"].default
    assert capped == autotune.candidates("scoring.column_lse", key, max_configs=5)  # seeded


def test_untuned_defaults_are_the_tiles_the_kernels_used_before_tuning():
    """min(cap, max(16, next_pow2(n))) per tile, as the launch wrappers chose them before the cache existed."""

    def old(n: int, cap: int) -> int:
        return min(cap, max(16, 1 << max(0, (n - 1).bit_length())))

    for n in (1, 5, 16, 40, 64, 100, 4096):
        rows = launch_config("attention_stats.row_lse", torch.device("cpu"), Q=bucket(n), S=4096, H=8, d=64, dtype="f")
        columns = launch_config(
            "attention_stats.column_sum", torch.device("cpu"), Q=16, C=bucket(n), H=8, d=64, dtype="f"
        )
        assert rows["BLOCK_Q"] == old(n, 64) and rows["BLOCK_K"] == 64
        assert columns["BLOCK_C"] == old(n, 64)
        assert launch_config("merge_compact", torch.device("cpu"), D=n, dtype="f")["BLOCK_D"] == old(n, 1024)
        # window_match sums elementwise products since its tie-rule fix: a smaller slice of D than tl.dot took
        match = launch_config("window_match", torch.device("cpu"), window=32, D=n, dtype="f")
        assert match["BLOCK_D"] == old(n, 32)


def test_bucket_rounds_up_to_a_power_of_two():
    assert [bucket(n) for n in (1, 16, 17, 576, 2880, 4096)] == [16, 16, 32, 1024, 4096, 4096]


@needs_triton
@pytest.mark.parametrize(
    ("split", "heads_per_program", "masked_prefix"),
    [(256, 1, 0), (256, 4, 0), (512, 16, 0), (256, 4, 300)],
)
def test_scoring_with_query_chunks_and_head_blocks_matches_the_fallback(
    split, heads_per_program, masked_prefix, device
):
    """Several query chunks (S > SPLIT_S), uneven head blocks, and a chunk with no real query at all."""
    generator = torch.Generator().manual_seed(split + heads_per_program)
    heads, seq = 6, 600
    q = torch.randn(1, heads, seq, 32, generator=generator).to(device)
    k = torch.randn(1, 3, seq, 32, generator=generator).to(device)
    guide_index = torch.arange(seq - 40, seq, device=device)[None]
    guide_count = torch.tensor([40], device=device)
    mask = torch.ones(1, seq, dtype=torch.bool, device=device)
    mask[0, :masked_prefix] = False
    column = {**KERNELS["scoring.column_lse"].default, "SPLIT_S": split, "BLOCK_S": 64, "BLOCK_T": 16}
    rows = {**KERNELS["scoring.row_sum"].default, "HEADS_PER_PROGRAM": heads_per_program, "BLOCK_S": 32}
    got = cross_attention_scores_triton(q, k, guide_index, guide_count, mask, 0.2, (column, rows))
    expected = cross_attention_scores_torch(q, k, guide_index, guide_count, mask, 0.2)
    agreement.check_scores(got, expected, q, k, 0.2, guides=40)
    assert bool((got[0, :masked_prefix] == 0).all())


def test_cache_round_trip_and_lookup(cache_dir):
    spec = KERNELS["merge_compact"]
    key = spec.key(D=64, dtype="float32")
    tuned = {**spec.default, "BLOCK_D": 128, "num_warps": 2}
    path = store_configs("cpu", "test", {"merge_compact": {key: {"config": tuned, "time_s": 1.0}}})
    assert path == cache_path("cpu") and path.parent == cache_dir
    assert launch_config("merge_compact", torch.device("cpu"), D=64, dtype="float32") == tuned
    assert launch_config("merge_compact", torch.device("cpu"), D=4096, dtype="float32") == spec.default
    # without an entry the default's tile is clamped to the dimension it tiles
    assert launch_config("merge_compact", torch.device("cpu"), D=100, dtype="float32")["BLOCK_D"] == 128
    # a second store keeps the first entry
    other = spec.key(D=128, dtype="float32")
    store_configs("cpu", "test", {"merge_compact": {other: {"config": dict(spec.default)}}})
    assert set(read_cache(path)["kernels"]["merge_compact"]) == {key, other}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot be read"),
        (json.dumps({"format": 99, "kernels": {}}), "is not format"),
        (json.dumps({"format": 1, "kernels": {"nope": {}}}), "unknown kernel"),
        (json.dumps({"format": 1, "kernels": {"merge_compact": {"D=64,dtype=float32": {}}}}), "has no config"),
        (
            json.dumps(
                {
                    "format": 1,
                    "kernels": {
                        "merge_compact": {
                            "D=64,dtype=float32": {"config": {"BLOCK_D": 100, "num_warps": 4, "num_stages": 1}}
                        }
                    },
                }
            ),
            "BLOCK_D=100 is not one of",
        ),
    ],
)
def test_a_bad_cache_file_is_an_error_naming_it_but_a_launch_only_warns(cache_dir, content, message):
    cache_path("cpu").write_text(content)
    with pytest.raises(TuningCacheError, match=message) as error:
        read_cache(cache_path("cpu"))
    assert str(cache_path("cpu")) in str(error.value) and "delete it or rerun lightkv autotune" in str(error.value)
    assert isinstance(error.value, UsageError)  # `lightkv autotune` prints it as one line
    # a kernel launch warns, naming the file, and launches with the default
    with pytest.warns(TuningCacheWarning, match=message) as warned:
        config = launch_config("merge_compact", torch.device("cpu"), D=64, dtype="float32")
    assert config == default_config("merge_compact", {"D": 64, "dtype": "float32"})
    assert str(cache_path("cpu")) in str(warned[0].message)


@needs_triton
def test_the_scoring_kernels_launch_with_the_cached_config(cache_dir, monkeypatch, device):
    """A tuned SPLIT_S / HEADS_PER_PROGRAM for the shape's key changes the launch grids."""
    heads, seq, count = 4, 300, 20
    dims = {"S": bucket(seq), "T": bucket(count), "H": heads, "d": 32, "dtype": "float32"}
    column = {**KERNELS["scoring.column_lse"].default, "SPLIT_S": 256}
    rows = {**KERNELS["scoring.row_sum"].default, "HEADS_PER_PROGRAM": 1}
    store_configs(
        device_name(torch.device(device)),
        "test",
        {
            "scoring.column_lse": {KERNELS["scoring.column_lse"].key(**dims): {"config": column}},
            "scoring.row_sum": {KERNELS["scoring.row_sum"].key(**dims): {"config": rows}},
        },
    )
    grids = {}

    class Spy:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            grids[self.name] = grid
            return self.kernel[grid]

    monkeypatch.setattr(scoring, "column_lse_kernel", Spy("column", scoring.column_lse_kernel))
    monkeypatch.setattr(scoring, "row_sum_kernel", Spy("rows", scoring.row_sum_kernel))
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, seq, 32, generator=generator).to(device)
    guide_index, guide_count = torch.arange(count, device=device)[None], torch.tensor([count], device=device)
    mask = torch.ones(1, seq, dtype=torch.bool, device=device)
    out = scoring.cross_attention_scores(q, q, guide_index, guide_count, mask, backend="triton")
    assert grids["column"][2] == 2  # ceil(300 / 256) query chunks
    assert grids["rows"][2] == heads  # one head per program
    expected = cross_attention_scores_torch(q, q, guide_index, guide_count, mask, 32**-0.5)
    agreement.check_scores(out, expected, q, q, 32**-0.5, guides=count)


def test_preset_shapes_follow_the_schedule():
    shapes = stage_shapes.preset_shapes("llava-1.5", text_tokens=60)
    assert [s.window for s in shapes] == [4, 2, 1]
    assert shapes[0].seq == 576 + 60 and shapes[0].heads == 32 and shapes[0].hidden == 4096
    planned = plan_lengths(list(shapes[0].spans), PRESETS["llava-1.5"], shapes[0].seq)
    assert planned.exact and [s.seq for s in shapes] == list(planned.lengths[:3])
    assert [sum(span.length for span in s.spans) for s in shapes] == [576, 288, 144]


def test_parse_shape_rescales_images_and_rejects_bad_text():
    base = stage_shapes.preset_shapes("llava-1.5")[0]
    shape = stage_shapes.parse_shape("S=2980,T=100", base)
    assert len(shape.spans) == 5 and shape.seq == 2980 and shape.guide_tokens == 100
    assert stage_shapes.parse_shape("H=8,Hk=2", base).kv_heads == 2
    # the guides are exactly T text tokens, whatever S leaves around the images
    for text, images, seq in (("S=2880,T=128", 4, 2880), ("T=300", 1, 876), ("S=100,T=32", 1, 608)):
        shape = stage_shapes.parse_shape(text, base)
        assert (len(shape.spans), shape.seq) == (images, seq)
        guides = stage_shapes.guide_positions(shape)
        assert guides.numel() == shape.guide_tokens and guides.max() < shape.seq
    for bad in ("S=0", "X=3", "S=abc", "", "H=6,Hk=4"):
        with pytest.raises(ValueError):
            stage_shapes.parse_shape(bad, base)


def test_merge_problem_is_a_valid_stage_merge():
    shape = stage_shapes.preset_shapes("llava-1.5")[0]
    plan = plan_windows([list(shape.spans)], shape.seq, shape.window, shape.ratio, "default")
    x = torch.randn(shape.seq, 64)
    best, sim = window_best_match_torch(x, plan.a_rows, plan.a_offsets, plan.b_rows, plan.b_offsets)
    merged_into = choose_merges(plan, best, sim, 1, shape.seq)
    out_rows, src_offsets, src_rows = merge_lists(merged_into < 0, merged_into, "left")
    assert out_rows.numel() + src_rows.numel() == shape.seq
    assert src_rows.numel() == int(plan.merges_per_window.sum()) == 288
    assert sorted(torch.cat([out_rows, src_rows]).tolist()) == list(range(shape.seq))
    assert int(src_offsets[-1]) == src_rows.numel()


@needs_interpreter
def test_dry_run_checks_the_attention_statistics_tilings(monkeypatch):
    """Two values per tile (the full spaces run in `lightkv autotune --dry-run`, about a minute)."""
    kernels = ["attention_stats.row_lse", "attention_stats.column_sum"]
    for name in kernels:
        spec = KERNELS[name]
        smaller = {p: (v if p in LAUNCH_PARAMS else (min(v), spec.default[p])) for p, v in spec.space.items()}
        monkeypatch.setitem(KERNELS, name, dataclasses.replace(spec, space=smaller, dtype_defaults={}))
    shapes = stage_shapes.preset_shapes("llava-1.5")[:1]
    results = autotune.dry_run([(kernels, shapes[0])], lambda message: None)
    # three query sets (last token, text tokens, every token) on the small stage of 277 tokens
    assert sorted(r.key.split(",")[0] for r in results if r.kernel == kernels[0]) == ["Q=16", "Q=32", "Q=512"]
    assert len(results) == 6 and all(not r.rejected for r in results)
    assert all(r.tried == len(autotune.distinct_tilings(r.kernel)) == 4 for r in results)


@needs_interpreter
def test_dry_run_reports_a_tiling_that_disagrees_with_the_fallback(monkeypatch):
    real = kernel_problems.merge_compact_triton

    def broken(x, weights, out_rows, src_offsets, src_rows, config=None):
        out = real(x, weights, out_rows, src_offsets, src_rows, config)
        return out + 1 if config["BLOCK_D"] == 256 else out

    monkeypatch.setattr(kernel_problems, "merge_compact_triton", broken)
    shapes = stage_shapes.preset_shapes("llava-1.5")[:1]
    (result,) = autotune.dry_run([(["merge_compact"], shapes[0])], lambda message: None)
    assert result.tried == len(KERNELS["merge_compact"].space["BLOCK_D"])
    assert list(result.rejected) == ["BLOCK_D=256 num_warps=4 num_stages=3"]
    assert "KernelMismatch" in result.rejected["BLOCK_D=256 num_warps=4 num_stages=3"]


@pytest.mark.skipif(torch.cuda.is_available() and not INTERPRETING, reason="this machine can tune")
def test_autotune_without_a_gpu_refuses_plainly(cache_dir, capsys):
    assert main(["autotune"]) == 1
    err = capsys.readouterr().err
    assert "nothing was tuned" in err and "--dry-run" in err
    assert not any(cache_dir.iterdir())


@needs_interpreter
def test_autotune_dry_run_checks_tilings_and_cache_files(cache_dir, capsys):
    assert main(["autotune", "--dry-run", "--preset", "llava-1.5", "--kernels", "merge_compact"]) == 0
    out = capsys.readouterr().out
    assert "merge_compact" in out and "every tiling matches" in out
    cache_path("gpu-x").write_text("{broken")
    assert main(["autotune", "--dry-run", "--preset", "llava-1.5", "--kernels", "merge_compact"]) == 1
    assert "cannot be read" in capsys.readouterr().out


def test_autotune_rejects_unknown_kernels(capsys):
    assert main(["autotune", "--dry-run", "--kernels", "nope"]) == 2
    assert "unknown kernel" in capsys.readouterr().err
