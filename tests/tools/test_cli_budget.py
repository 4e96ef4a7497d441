"""The `lightkv` command line and the KV accounting it prints."""

from __future__ import annotations

import re

import pytest

from lightkv_core.budget import KVFootprint, layer_kv_lengths, vision_retention
from lightkv_core.cli import main


def test_layer_kv_lengths_both_conventions():
    lengths = [641, 353, 209, 137]
    after = layer_kv_lengths((12, 18, 24), lengths, 32, "after")
    assert after[:13] == [641] * 13 and after[13:19] == [353] * 6 and after[19:25] == [209] * 6
    assert after[25:] == [137] * 7
    at = layer_kv_lengths((12, 18, 24), lengths, 32, "at")
    assert at[11] == 641 and at[12] == 353 and at[18] == 209 and at[24] == 137
    with pytest.raises(ValueError, match="effect"):
        layer_kv_lengths((12,), [10, 5], 32, "before")
    with pytest.raises(ValueError, match="stage_lengths"):
        layer_kv_lengths((12, 18), [10, 5], 32)


def test_footprint_and_retention():
    kv = KVFootprint(kv_heads=32, head_dim=128, bytes_per_value=2)
    assert kv.bytes_per_token_layer == 16384
    assert kv.total_bytes([10, 20]) == 30 * 16384
    assert vision_retention([576, 576, 288, 72], 576) == pytest.approx((576 * 2 + 288 + 72) / (576 * 4))
    with pytest.raises(ValueError):
        vision_retention([], 576)


@pytest.mark.parametrize("layout, counts", [("default", [288, 144, 72]), ("reference", [288, 145, 73])])
def test_simulate_prints_stage_counts(layout, counts, capsys):
    assert main(["simulate", "--layout", layout, "--backend", "torch", "--hidden-size", "16"]) == 0
    out = capsys.readouterr().out
    vision = [int(m.group(1)) for m in re.finditer(r"^\s+\d+\s+\d+\s+\d+\s+0\.50\s+\d+\s+(\d+)", out, re.M)]
    assert vision == counts
    retention = [float(v) for v in re.findall(r"retention ([\d.]+)%", out)]
    expected_after = (13 * 576 + 6 * counts[0] + 6 * counts[1] + 7 * counts[2]) / (32 * 576) * 100
    assert retention[0] == pytest.approx(expected_after, abs=0.05)


def test_simulate_scaled_schedule_and_errors(capsys):
    assert main(["simulate", "--num-layers", "8", "--grid", "12x16", "--backend", "torch"]) == 0
    assert "layers (3, 4, 6)" in capsys.readouterr().out
    assert main(["simulate", "--ratios", "0.5-2-0.5"]) == 2
    assert "merge_ratios must lie in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--grid", "24"])


@pytest.mark.parametrize(
    "options, message",
    [
        (["--ratios", "0.5-2-0.5"], "merge_ratios must lie in [0, 1], got (0.5, 2.0, 0.5)"),
        (["--layers", "12-18"], "need one entry per stage, got 2, 3 and 3"),
        (["--num-layers", "2"], "cannot fit 3 merge layers into 2 layers"),
        (["--heads", "5"], "--heads must be 1, 3 or even"),
        (["--text-before", "0", "--text-after", "0"], "guide='all_text' weighs the merges by the text tokens outside"),
        (["--guide", "prompt", "--text-after", "0"], "after the last image (--text-after), and there are none"),
    ],
)
def test_simulate_usage_errors_are_one_line(options, message, capsys):
    assert main(["simulate", "--backend", "torch", *options]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("lightkv: error: ") and captured.err.count("\n") == 1
    assert message in captured.err


@pytest.mark.parametrize("option", ["--num-layers", "--images", "--hidden-size", "--heads", "--head-dim"])
def test_simulate_refuses_sizes_below_one(option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", option, "0"])
    assert exit_info.value.code == 2
    assert f"argument {option}: expected an integer >= 1, got '0'" in capsys.readouterr().err


def test_presets_lists_released_schedules(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-vl" in out and "12-17-22" in out and "6-4-2" in out
