"""The kernel benchmark (``perf/kernels.py``): its plain-PyTorch baselines agree with the library kernels, its checks
reject wrong results, and a small run writes well-formed results."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from lightkv_core.kernels import merge_compact, window_best_match
from lightkv_perf import kernels as bench
from lightkv_perf import kernels_plain as plain
from lightkv_perf.common import device, device_tag

# Two 8x8 images between text; windows 2 then 1 with ratios that leave some A tokens unmerged in each window.
TINY = bench.Prompt("tiny", text_before=3, images=2, grid=8, text_after=5)
HIDDEN = 48

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module", params=[torch.float32, torch.float16], ids=["float32", "float16"])
def cases(request) -> list[bench.StageCase]:
    return bench.build_cases(TINY, HIDDEN, request.param, torch.device("cpu"), (2, 1), (0.4, 0.3), backend="torch")


def test_cases_are_the_stage_inputs(cases):
    first, second = cases
    assert (first.window, second.window) == (2, 1)
    assert first.tokens == TINY.tokens == 136
    # stage 1: 4 windows of 16 tokens per image, floor(0.4 * 16) = 6 merge in each
    assert first.merge_args[4].numel() == 2 * 4 * 6 == int((first.merged_into >= 0).sum())
    assert second.tokens == 136 - 48
    assert second.merge_args[4].numel() == 2 * 12  # floor(0.3 * 40) per image


def test_plain_baselines_agree_with_the_kernels(cases, backend):
    for case in cases:
        x = case.match_args[0]
        best, sim = window_best_match(*case.match_args, backend=backend)
        plain_best, plain_sim = plain.plain_window_match(x, plain.image_sets(case.match_args, case.window))
        merged = merge_compact(*case.merge_args, backend=backend)
        plain_merged = plain.plain_merge(*plain.plain_merge_args(case.merge_args, case.merged_into))
        if x.dtype == torch.float32:  # random rows: no ties, so the very same indices
            assert torch.equal(plain_best, best)
            torch.testing.assert_close(plain_sim, sim, rtol=0, atol=1e-5)
            torch.testing.assert_close(plain_merged, merged, rtol=1e-5, atol=1e-6)
        else:
            bench.check_window_match(case.match_args, (plain_best, plain_sim), (best, sim), "plain", plain=True)
            bench.check_merge(plain_merged, merged, case.merge_args[3], "plain")
        keep = case.merged_into < 0
        assert merged.shape == (int(keep.sum()), HIDDEN)
        assert not torch.equal(merged, x[keep])  # something was merged


def test_checks_reject_wrong_results(cases):
    case = cases[0]
    x, _, _, b_rows, b_offsets = case.match_args
    best, sim = window_best_match(*case.match_args, backend="torch")
    assert bench.check_window_match(case.match_args, (best, sim), (best, sim), "same") == 0

    # another B token of the same window, with the right similarity reported: only the index is wrong
    other = best.clone()
    other[0] = b_offsets[0] + (best[0] - b_offsets[0] + 1) % (b_offsets[1] - b_offsets[0])
    with pytest.raises(RuntimeError, match="cosine of the chosen pair"):
        bench.check_window_match(case.match_args, (other, sim), (best, sim), "wrong index")
    # a tie: the other token made a copy of the best one; either pick passes, and counts as a mismatch
    tied_x = x.clone()
    tied_x[b_rows[other[0]]] = x[b_rows[best[0]]]
    tied_args = (tied_x, *case.match_args[1:])
    tied_best, tied_sim = window_best_match(*tied_args, backend="torch")
    assert int(tied_best[0]) in (int(best[0]), int(other[0]))
    alternative = tied_best.clone()
    alternative[0] = other[0] if tied_best[0] == best[0] else best[0]
    assert bench.check_window_match(tied_args, (alternative, tied_sim), (tied_best, tied_sim), "tie") == 1
    # a B token of the next window
    outside = best.clone()
    outside[0] = b_offsets[1]
    with pytest.raises(RuntimeError, match="outside"):
        bench.check_window_match(case.match_args, (outside, sim), (best, sim), "wrong window")
    shifted = sim.clone()
    shifted[-1] += 0.01
    with pytest.raises(RuntimeError, match="similarity"):
        bench.check_window_match(case.match_args, (best, shifted), (best, sim), "wrong value")

    merged = merge_compact(*case.merge_args, backend="torch")
    x, weights, sources, targets, keep = plain.plain_merge_args(case.merge_args, case.merged_into)
    unweighted = plain.plain_merge(x, torch.ones_like(weights), sources, targets, keep)
    with pytest.raises(RuntimeError, match="differ"):
        bench.check_merge(unweighted, merged, case.merge_args[3], "unweighted")
    with pytest.raises(RuntimeError, match="instead of"):
        bench.check_merge(merged[1:], merged, case.merge_args[3], "short")


def test_run_writes_rows_ratios_and_plot(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    argv = ["--quick", "--out", str(tmp_path), "--prompts", "llava-1.5", "--hidden", "32", "--repeats", "1"]
    assert bench.run(parser.parse_args(argv)) == 0

    result = json.loads((tmp_path / f"kernels-{device_tag()}.json").read_text())
    assert (tmp_path / f"kernels-{device_tag()}.png").stat().st_size > 0
    assert result["benchmark"] == "kernels" and {"machine", "versions", "command"} <= set(result)
    skip = bench.triton_skip_reason(device())
    impls = {"torch", "plain"} if skip else {"torch", "plain", "triton"}
    assert result["skipped"] == ([{"impl": "triton", "reason": skip}] if skip else [])

    rows = result["rows"]
    keys = {"kernel", "prompt", "stage", "window", "tokens", "hidden", "impl", "time_s", "peak_bytes"}
    assert all(set(row) == keys for row in rows)
    # the released schedule on LLaVA-1.5: 576 vision tokens -> 288 -> 144 with 59 text tokens around them
    stages = {(1, 4, 635), (2, 2, 347), (3, 1, 203)}
    expected = {(kernel, *stage, impl) for kernel in bench.KERNELS for stage in stages for impl in impls}
    assert {(r["kernel"], r["stage"], r["window"], r["tokens"], r["impl"]) for r in rows} == expected
    assert all(r["prompt"] == "llava-1.5" and r["hidden"] == 32 for r in rows)
    assert all(r["time_s"] > 0 and r["peak_bytes"] >= 0 for r in rows)

    assert len(result["ratios"]) == len(bench.KERNELS) * len(stages)
    for entry in result["ratios"]:
        assert set(entry["vs_torch"]) == impls and entry["vs_torch"]["torch"] == 1.0
        times = {r["impl"]: r["time_s"] for r in rows if (r["kernel"], r["stage"]) == (entry["kernel"], entry["stage"])}
        assert entry["vs_torch"]["plain"] == pytest.approx(times["plain"] / times["torch"], rel=1e-3)
    assert ("timing_note" in result) == (device().type == "cpu")
    assert "plain" in capsys.readouterr().out
