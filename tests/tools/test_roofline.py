"""The roofline model (``perf/roofline.py``): byte and FLOP counts of each kernel against hand counts on tiny shapes,
the floors against the datasheet arithmetic, and the three speed targets judged from made-up GPU results."""

from __future__ import annotations

import json

import pytest
import torch

from lightkv_core.kernels.tuning import launch_config
from lightkv_perf import commands, roofline, scoring
from lightkv_perf.common import device_tag
from lightkv_perf.roofline import GPUS, Cost


def test_scoring_cost_counts_two_passes_and_their_partials():
    # B=1, H=2 query heads over Hk=1 key head, S=10, T=3 guides, d=4, float16; SPLIT_S=4 -> 3 chunks
    per_pass = 2 * 10 * 4 * 2 + 1 * 3 * 4 * 2 + (10 + 4 * 3 + 4)  # queries 160, guide keys 24, mask/index/count 26
    lse = 2 * 3 * 3 * 4  # (H, chunks, T) float32, written by pass 1 and read by pass 2
    one_block = roofline.scoring_cost(1, 2, 1, 10, 3, 4, torch.float16, split_s=4, heads_per_program=2)
    assert one_block.bytes == 2 * per_pass + 2 * lse + 10 * 4 == 604
    # one head per program: two (S,) partial rows, then their sum reads them and writes the output
    two_blocks = roofline.scoring_cost(1, 2, 1, 10, 3, 4, torch.float16, split_s=4, heads_per_program=1)
    assert two_blocks.bytes == 2 * per_pass + 2 * lse + 2 * 10 * 4 + (2 * 10 * 4 + 10 * 4) == 764
    assert one_block.flops == two_blocks.flops == 2 * (2 * 2 * 10 * 3 * 4) == 960
    assert one_block.unit == "tensor"
    fp32 = roofline.scoring_cost(1, 2, 1, 10, 3, 4, torch.float32, split_s=16, heads_per_program=2)
    assert fp32.bytes == 2 * (320 + 48 + 26) + 2 * (2 * 1 * 3 * 4) + 40 and fp32.unit == "fp32"


def test_window_match_cost_reads_each_row_once_and_recomputes_norms_per_tile():
    # window 0: 3 A against 2 B; window 1: 1 A and no B (its A token is written, never compared); D=4, float16
    cost = roofline.window_match_cost([3, 1], [2, 0], hidden=4, dtype=torch.float16, block_a=2, block_b=1)
    features = (3 + 2) * 4 * 2
    index = 8 * 4 + 8 * 2 + 2 * 8 * 3 + 2 * 8 * 3  # A rows, B rows, two offset lists of 3, tile tables of 2 + 1 tiles
    outputs = 4 * (8 + 4)  # best int64, sim float32
    assert cost.bytes == features + index + outputs == 232
    # 6 dot products of 4 features; A norms once per B tile (2 tiles), B norms once per A tile (2 tiles)
    assert cost.flops == 2 * 4 * (3 * 2 + 3 * 2 + 2 * 2) == 128
    assert cost.unit == "fp32"


def test_merge_compact_cost_counts_targets_sources_outputs_and_lists():
    # 3 output rows, 2 real, 1 of them receiving 2 merged rows; D=4, float16 (8 bytes a row)
    cost = roofline.merge_compact_cost(out_rows=3, real_rows=2, receivers=1, sources=2, hidden=4, dtype=torch.float16)
    rows = (2 + 2 + 3) * 8
    weights = 4 * (1 + 2)
    lists = 8 * (3 + 4 + 2)  # out_rows, src_offsets, src_rows (int64)
    assert cost.bytes == rows + weights + lists == 140
    assert cost.flops == 2 * 4 * (1 + 2) + 4 * 1 == 28


@pytest.mark.parametrize(("causal", "keys", "pairs", "expected_bytes"), [(True, 6, 3 + 6, 229), (False, 8, 16, 247)])
def test_attention_stats_cost_reads_keys_up_to_the_last_query(causal, keys, pairs, expected_bytes):
    # B=1, H=2, Hk=1, S=8, query rows 2 and 5, C=3 columns, d=4, float16
    cost = roofline.attention_stats_cost(1, 2, 1, 8, [2, 5], 3, 4, torch.float16, causal)
    first = 2 * 2 * 4 * 2 + keys * 4 * 2 + keys + 2 * 4 + 2 * 2 * 4  # queries, keys, mask, query index, lse
    second = 2 * 2 * 4 * 2 + 3 * 4 * 2 + 3 * 5 + 2 * 4 + 2 * 2 * 4 + 2 * 3 * 4  # ..., columns, lse, output
    assert cost.bytes == first + second == expected_bytes
    assert cost.flops == 2 * 2 * 4 * (pairs + 2 * 3)


def test_floor_is_the_slower_of_bandwidth_and_compute_per_gpu():
    # 4e12 bytes and one second of dense tensor math: memory-bound on an H100 SXM, compute-bound on an H200
    cost = Cost(bytes=4 * 10**12, flops=int(989.4e12), unit="tensor")
    h100, h200 = GPUS["h100-sxm"], GPUS["h200"]
    assert cost.bandwidth_s(h100) == pytest.approx(4 / 3.35)
    assert cost.floor_s(h100) == pytest.approx(4 / 3.35)
    assert cost.bandwidth_s(h200) == pytest.approx(4 / 4.8)
    assert cost.floor_s(h200) == pytest.approx(1.0)
    fp32 = Cost(bytes=0, flops=int(3 * 66.9e12), unit="fp32")
    assert fp32.floor_s(h100) == fp32.floor_s(h200) == pytest.approx(3.0)
    record = cost.record()
    assert record["floors"]["h200"] == {
        "bandwidth_s": pytest.approx(4 / 4.8),
        "compute_s": pytest.approx(1.0),
        "floor_s": pytest.approx(1.0),
    }
    assert roofline.floor_cells(record) == f"{4 / 3.35 * 1e6:>9.1f}  mem{1e6:>9.1f} math"


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA H100 SXM5 80GB", "h100-sxm"),
        ("NVIDIA H100 PCIe", None),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA H200", "h200"),
        ("NVIDIA H200 NVL", None),
        ("NVIDIA GH200 480GB", None),
        ("NVIDIA A100-SXM4-80GB", None),
    ],
)
def test_gpu_of_knows_only_the_datasheet_parts(name, key):
    assert roofline.gpu_of(name) == key


def test_scoring_roofline_uses_the_launch_configs():
    record = roofline.scoring_roofline(2880, 128, 32, 32, 128, torch.float16, torch.device("cpu"))
    dims = {"S": 4096, "T": 128, "H": 32, "d": 128, "dtype": "float16"}
    lse, rows = (launch_config(name, torch.device("cpu"), **dims) for name in ("scoring.column_lse", "scoring.row_sum"))
    assert record["config"] == {"scoring.column_lse": lse, "scoring.row_sum": rows}
    cost = roofline.scoring_cost(1, 32, 32, 2880, 128, 128, torch.float16, lse["SPLIT_S"], rows["HEADS_PER_PROGRAM"])
    assert record["bytes"] == cost.bytes and record["flops"] == cost.flops
    # the two passes read the queries twice: about twice what reading everything once needs
    once = scoring.floor_bytes(2880, 128, 32, 32, 128, 2)
    assert 2 * once - 2880 * 4 < record["bytes"] < 2.1 * once


# ----------------------------------------------------------------------------------------------
# The targets, from results shaped like a GPU run's


def gpu_scoring(device: str, triton_s: float, column_softmax_s: float, bandwidth_s: float = 10e-6) -> dict:
    """A scoring result at S=2880, T=128 with one Triton and one column_softmax row and a roofline entry whose
    bandwidth time on both GPUs is ``bandwidth_s``."""
    floors = {key: {"bandwidth_s": bandwidth_s, "compute_s": 1e-6, "floor_s": bandwidth_s} for key in GPUS}
    rows = [
        {"S": 2880, "T": 128, "impl": "triton", "time_s": triton_s},
        {"S": 2880, "T": 128, "impl": "column_softmax", "time_s": column_softmax_s},
        {"S": 640, "T": 128, "impl": "triton", "time_s": 1.0},  # not the targets' length: ignored
    ]
    roofline_entries = [{"S": 2880, "T": 128, "bytes": 1, "flops": 1, "flop_unit": "tensor", "floors": floors}]
    return {"benchmark": "scoring", "machine": {"device": device}, "rows": rows, "roofline": roofline_entries}


def gpu_prefill(size: str, shares: list[float], device: str = "NVIDIA H200") -> dict:
    """A prefill result whose cases spend ``shares`` of the LightKV prefill reducing."""
    cases = [
        {"model": "reference", "vision_tokens": 576 * (i + 1), "lightkv": {"reduce_s_median": s, "prefill_s_median": 1}}
        for i, s in enumerate(shares)
    ]
    return {"benchmark": "prefill", "machine": {"device": device}, "size": size, "cases": cases}


def statuses(results: list[dict]) -> list[str]:
    return [target.status for target in roofline.targets(results)]


def test_targets_pass_and_fail_at_their_thresholds():
    assert statuses([gpu_scoring("NVIDIA H200", 20e-6, 30e-6), gpu_prefill("7b", [0.01, 0.002])]) == ["PASS"] * 3
    # just over 2x the floor; 1.49x faster than column_softmax; one case at 1.1%
    assert statuses([gpu_scoring("NVIDIA H200", 20.1e-6, 29.9e-6), gpu_prefill("7b", [0.002, 0.011])]) == ["FAIL"] * 3
    detail = roofline.targets([gpu_scoring("NVIDIA H100 80GB HBM3", 15e-6, 30e-6)])[0].detail
    assert detail == "T=128: 15.0 us = 1.50x the H100 SXM bandwidth floor 10.0 us"


def test_targets_that_the_results_cannot_judge_are_na():
    # another GPU: no datasheet floor for (a), but (b) is a plain ratio
    a100 = roofline.targets([gpu_scoring("NVIDIA A100-SXM4-80GB", 20e-6, 40e-6)])
    assert [target.status for target in a100] == ["N/A", "PASS", "N/A"]
    assert a100[0].detail == "no datasheet floor for NVIDIA A100-SXM4-80GB (H100 SXM and H200 only)"
    cpu = {"benchmark": "scoring", "machine": {"device": "CPU (x86_64), 2 threads"}, "rows": [], "roofline": []}
    judged = roofline.targets([cpu, gpu_prefill("small", [0.001], device="CPU (x86_64), 2 threads")])
    assert [target.status for target in judged] == ["N/A"] * 3
    assert judged[0].detail == "no Triton row at S=2880 on CPU (x86_64), 2 threads (needs a GPU run)"
    assert statuses([gpu_prefill("small", [0.001])]) == ["N/A"] * 3
    assert statuses([]) == ["N/A"] * 3


def test_main_judges_result_files_and_exits_non_zero_unless_all_pass(tmp_path, capsys):
    scoring_path, prefill_path = tmp_path / "scoring-h200.json", tmp_path / "prefill-h200.json"
    scoring_path.write_text(json.dumps(gpu_scoring("NVIDIA H200", 20e-6, 30e-6)))
    prefill_path.write_text(json.dumps(gpu_prefill("7b", [0.005])))
    assert roofline.main(["--targets", str(scoring_path), str(prefill_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["PASS"] * 3
    assert lines[2] == "PASS  (c) score + group + merge <= 1% of a 7B prefill: reference 576 vision: 0.50%"
    assert roofline.main(["--targets", str(scoring_path)]) == 1
    assert capsys.readouterr().out.splitlines()[2].startswith("N/A   (c)")


def test_bench_prints_the_floor_beside_gpu_triton_times(capsys):
    result = gpu_scoring("NVIDIA H100 80GB HBM3", 15e-6, 30e-6)
    scoring.print_roofline(result)
    out = capsys.readouterr().out
    assert "triton us  x floor" in out
    assert f"{'15.0':>11}{'1.50':>9}" in out  # 15 us over the 10 us floor
    assert "PASS  (b) scoring >= 1.5x faster than a plain column softmax: T=128: 2.00x" in out
    result["machine"]["device"] = "NVIDIA A100-SXM4-80GB"
    scoring.print_roofline(result)
    assert f"{'15.0':>11}{'n/a':>9}" in capsys.readouterr().out


def test_the_floor_is_printed_without_comparison_on_a_cpu(capsys):
    result = {"machine": {"device": "CPU"}, "rows": [], "roofline": gpu_scoring("x", 1, 1)["roofline"]}
    scoring.print_roofline(result)
    out = capsys.readouterr().out
    assert "x floor" not in out and "GPU rows only" in out
    assert " 2880  128" in out


def test_bench_all_ends_with_the_targets_of_the_results_it_wrote(tmp_path, capsys):
    (tmp_path / f"scoring-{device_tag()}.json").write_text(json.dumps(gpu_scoring("NVIDIA H200", 30e-6, 30e-6)))
    (tmp_path / f"prefill-{device_tag()}.json").write_text(json.dumps(gpu_prefill("7b", [0.004])))
    commands.print_targets(tmp_path)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "=== speed targets (perf/roofline.py) ==="
    assert [line.split()[0] for line in lines[2:]] == ["FAIL", "FAIL", "PASS"]
