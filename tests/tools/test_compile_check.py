"""The ahead-of-time compile check (lightkv_core.compile_check) and autotune's static pruning, on a CPU.

Triton compiles for NVIDIA targets without a GPU (its wheel ships ptxas and nvdisasm). Every kernel's default config
is compiled once per module for sm_80, sm_90 and sm_100 in fp16, bf16 and fp32, on the shapes of llava-next's first
stage, in two worker processes with a Triton cache under pytest's tmp (about a minute on 2 cores). Fast tests check
the pruning decisions on made-up records; one compiles a config known to spill, so a spill reading of 0 means
something."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from lightkv_core.cli import main
from lightkv_core.compile_check import (
    MATMUL_KERNELS,
    PRUNE_CAUSES,
    SHARED_MEMORY_LIMITS,
    Pruning,
    compile_all,
    config_text,
    default_jobs,
    default_problems,
    prune_reason,
    static_prune,
)
from lightkv_core.compile_worker import CompileRecord
from lightkv_core.kernels.launch import interpreting
from lightkv_core.kernels.tuning import DTYPE_NAMES, KERNELS, TARGETS, default_config, parse_key
from lightkv_core.stage_shapes import preset_shapes

pytest.importorskip("triton")

FIRST_STAGE = preset_shapes("llava-next")[0]


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[CompileRecord]:
    """The default of every kernel, dtype and target, compiled on llava-next's first stage."""
    jobs = default_jobs([(list(KERNELS), FIRST_STAGE)], list(TARGETS))
    return compile_all(jobs, workers=2, triton_cache=tmp_path_factory.mktemp("triton-cache"))


def record(**fields) -> CompileRecord:
    """A made-up compile of scoring.column_lse: no spill, 48 KiB of shared memory, 8 tensor-core instructions."""
    base = CompileRecord(
        kernel="scoring.column_lse",
        key="S=4096,T=128,H=32,d=128,dtype=float16",
        dtype="float16",
        target="sm_90",
        config=dict(KERNELS["scoring.column_lse"].default),
        compile_s=1.0,
        registers=80,
        spill_stores=0,
        spill_loads=0,
        stack=0,
        shared_memory=48 * 1024,
        tensor_core_ops=8,
    )
    return dataclasses.replace(base, **fields)


def test_every_kernel_compiles_its_default_in_every_dtype_for_every_target(records):
    compiled = {(r.kernel, r.dtype, r.target) for r in records}
    assert compiled == set(itertools.product(KERNELS, DTYPE_NAMES, TARGETS))
    assert [f"{r.kernel} {r.dtype} {r.target}: {r.error}" for r in records if r.error is not None] == []
    for r in records:
        assert r.config == default_config(r.kernel, parse_key(r.key))
    # the attention statistics compile once per query set: the last token, the text tokens, every token
    assert len({r.key for r in records if r.kernel == "attention_stats.row_lse" and r.dtype == "float16"}) == 3


def test_no_default_spills_or_exceeds_shared_memory(records):
    spilling = [f"{r.kernel} {r.dtype} {r.target}" for r in records if r.spill_stores or r.spill_loads]
    assert spilling == []
    assert all(0 < r.registers <= 255 for r in records)
    assert all(r.shared_memory <= SHARED_MEMORY_LIMITS[r.target] for r in records)


def test_matmul_kernels_use_tensor_cores_on_half_precision_and_ieee_float32_otherwise(records):
    for r in records:
        if r.kernel in MATMUL_KERNELS and r.dtype != "float32":
            assert r.tensor_core_ops > 0, f"{r.kernel} {r.dtype} {r.target} uses no tensor cores"
        else:  # float32 dots are IEEE (no TF32); window_match and merge_compact multiply no tiles
            assert r.tensor_core_ops == 0, f"{r.kernel} {r.dtype} {r.target} uses tensor cores"
    assert default_problems(records) == []


def test_prune_reason_names_the_cause():
    limit = SHARED_MEMORY_LIMITS["sm_80"]
    assert prune_reason(record(), limit) is None
    assert prune_reason(record(shared_memory=limit), limit) is None
    failed = prune_reason(record(error="PTXASError: `ptxas` failed with error code 255"), limit)
    assert failed.startswith("fails to compile") and "ptxas" in failed
    assert prune_reason(record(spill_stores=16, spill_loads=0), limit).startswith("spills registers: 16 B stored")
    assert prune_reason(record(spill_loads=8), limit).startswith("spills registers")
    assert prune_reason(record(shared_memory=limit + 1), limit).startswith("exceeds shared memory: 166,913 B")


def test_default_problems_flag_half_precision_without_tensor_cores_and_float32_with_them():
    assert default_problems([record()]) == []
    assert "0 tensor-core instructions" in default_problems([record(tensor_core_ops=0)])[0]
    fp32 = record(dtype="float32", key="S=4096,T=128,H=32,d=128,dtype=float32", tensor_core_ops=4)
    assert "4 tensor-core instructions" in default_problems([fp32])[0]
    window_match = record(kernel="window_match", key="window=32,D=4096,dtype=float16", tensor_core_ops=0)
    assert default_problems([window_match]) == []  # it multiplies no tiles (its tie rule)
    assert "spills registers" in default_problems([record(spill_stores=4)])[0]


def test_pruning_counts_refusals_by_cause_and_names_a_refused_default():
    pruning = Pruning("sm_80")
    default = record(target="sm_80")
    other = record(target="sm_80", config={**default.config, "BLOCK_S": 128})
    pruning.add(default, 1000)  # 48 KiB is over this made-up limit
    pruning.add(other, 10**6)
    pruning.add(dataclasses.replace(other, config={**other.config, "BLOCK_T": 64}, spill_stores=8), 10**6)
    assert pruning.tried == {"scoring.column_lse": 3}
    refused = pruning.refused[("scoring.column_lse", default.key)]
    assert sorted(reason.split(":")[0] for reason in refused.values()) == sorted(PRUNE_CAUSES[1:])
    summary = pruning.summary()
    assert "3 compiled,    2 refused (1 spills registers, 1 exceeds shared memory)" in summary
    text = config_text(default.config)
    assert pruning.refused_defaults() == [f"scoring.column_lse [{default.key}]: the default {text} {refused[text]}"]


def test_static_prune_refuses_a_spilling_candidate_and_keeps_the_default():
    """The float32 column_lse tiles the default had before the compile check spill thousands of bytes on sm_90."""
    spilling = {"BLOCK_S": 64, "BLOCK_T": 32, "SPLIT_S": 512, "num_warps": 4, "num_stages": 3}

    def candidates(kernel: str, key: str) -> list[dict[str, int]]:
        return [default_config(kernel, parse_key(key)), spilling]

    jobs = [(["scoring.column_lse"], FIRST_STAGE)]
    pruning = static_prune(jobs, torch.float32, "sm_90", SHARED_MEMORY_LIMITS["sm_90"], candidates, lambda _: None)
    assert pruning.tried == {"scoring.column_lse": 2}
    (refused,) = pruning.refused.values()
    assert list(refused) == [config_text(spilling)]
    assert refused[config_text(spilling)].startswith("spills registers")
    assert pruning.refused_defaults() == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--compile-only", "--target", "sm_75"], "unknown --target 'sm_75'; choose from sm_80, sm_90, sm_100"),
        (["--target", "sm_90"], "--target needs --dry-run or --compile-only"),
        (["--dry-run", "--compile-only"], "cannot be combined"),
    ],
)
def test_autotune_rejects_bad_compile_options_in_one_line(argv, message, capsys):
    assert main(["autotune", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_compile_only_writes_the_table_with_its_run_record(tmp_path, capsys):
    argv = ["autotune", "--compile-only", "--target", "sm_80", "--kernels", "merge_compact", "--preset", "llava-1.5"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    table = json.loads((tmp_path / "compile-sm_80.json").read_text())
    assert table["target"] == "sm_80" and table["shared_memory_limit"] == 166_912
    assert table["command"].startswith("lightkv autotune --compile-only --target sm_80")
    assert {"machine", "versions"} <= set(table) and "triton" in table["versions"]
    assert sorted(entry["dtype"] for entry in table["compiles"]) == sorted(DTYPE_NAMES)
    assert all(entry["registers"] > 0 and entry["error"] is None for entry in table["compiles"])
    assert "no default fails, spills or exceeds shared memory" in capsys.readouterr().out


@pytest.mark.skipif(not interpreting(), reason="the dry run re-executes itself under TRITON_INTERPRET=1")
def test_dry_run_with_a_target_reports_static_pruning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIGHTKV_CACHE_DIR", str(tmp_path))
    argv = ["autotune", "--dry-run", "--target", "sm_90", "--preset", "llava-1.5", "--kernels", "merge_compact"]
    assert main([*argv, "--max-configs", "3"]) == 0
    out = capsys.readouterr().out
    assert "static pruning for sm_90" in out
    assert "merge_compact                 3 compiled,    0 refused" in out and "every tiling matches" in out
