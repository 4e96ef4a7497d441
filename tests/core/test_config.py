"""Schedules: parsing, validation and the released presets."""

from __future__ import annotations

import numpy as np
import pytest

from lightkv_core import PRESET_DEPTHS, LightKVConfig


def test_parses_dash_strings():
    config = LightKVConfig("12-18-24", "4-2-1", "0.5-0.5-0.5")
    assert config.merge_layers == (12, 18, 24)
    assert config.merge_windows == (4, 2, 1)
    assert config.merge_ratios == (0.5, 0.5, 0.5)
    assert config.stage_at(18) == (2, 0.5)
    assert config.stage_at(17) is None


def test_presets():
    assert LightKVConfig.preset("llava-1.5").merge_layers == (12, 18, 24)
    assert LightKVConfig.preset("LLaVA_NeXT").merge_windows == (4, 2, 1)
    qwen = LightKVConfig.preset("qwen2.5-vl", guide="prompt")
    assert (qwen.merge_layers, qwen.merge_windows, qwen.guide) == ((12, 17, 22), (6, 4, 2), "prompt")
    assert LightKVConfig.preset("llava-1.5").position_mode == "original"
    assert LightKVConfig.preset("llava-1.5", layout="reference").position_mode == "compact"
    with pytest.raises(ValueError, match="known presets"):
        LightKVConfig.preset("llava-2")


def test_scaled_to_a_smaller_model():
    config = LightKVConfig.preset("llava-1.5").scaled_to(8, PRESET_DEPTHS["llava-1.5"])
    assert config.merge_layers == (3, 4, 6)
    assert LightKVConfig.preset("llava-1.5").scaled_to(16, 32).merge_layers == (6, 9, 12)
    with pytest.raises(ValueError, match="cannot fit"):
        LightKVConfig.preset("llava-1.5").scaled_to(2, 32)


@pytest.mark.parametrize(
    "args, match",
    [
        (("12-18", "4-2-1", "0.5-0.5-0.5"), "one entry per stage"),
        (("18-12-24", "4-2-1", "0.5-0.5-0.5"), "ascending"),
        (("12-12-24", "4-2-1", "0.5-0.5-0.5"), "distinct"),
        (("12-18-24", "4-0-1", "0.5-0.5-0.5"), "merge_windows"),
        (("12-18-24", "4-2-1", "0.5-1.5-0.5"), "merge_ratios"),
        (("12-x-24", "4-2-1", "0.5-0.5-0.5"), "merge_layers takes a comma-separated list of ints"),
    ],
)
def test_bad_schedules(args, match):
    with pytest.raises(ValueError, match=match):
        LightKVConfig(*args)


def test_bad_options():
    with pytest.raises(ValueError, match="guide"):
        LightKVConfig("12", "4", "0.5", guide="image")
    with pytest.raises(ValueError, match="layout"):
        LightKVConfig("12", "4", "0.5", layout="square")
    with pytest.raises(ValueError, match="positions"):
        LightKVConfig("12", "4", "0.5", positions="absolute")


# --- issue 21: no schedule value is read as another one -----------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (("12", "4", "-0.5"), "merge_ratios takes .* got '-0.5': it starts with '-'"),
        (("12-18", "4-2", "0.5,-0.25"), "merge_ratios takes .* got '0.5,-0.25': '-0.25' is negative"),
        (("-12", "4", "0.5"), "merge_layers takes .* got '-12': it starts with '-'"),
        (((-1,), (4,), (0.5,)), r"merge_layers takes ints, got \(-1,\): -1 is negative"),
        (((12,), (4,), (-0.5,)), r"merge_ratios takes floats, got \(-0.5,\): -0.5 is negative"),
        (((12.7,), (4,), (0.5,)), r"merge_layers takes ints, got \(12.7,\): 12.7 is a float, not an integer"),
        (((12,), (4.9,), (0.5,)), r"merge_windows takes ints, got \(4.9,\): 4.9 is a float, not an integer"),
        (((12.0,), (4,), (0.5,)), r"merge_layers takes ints, got \(12.0,\): 12.0 is a float"),
        (("12.7", "4", "0.5"), "merge_layers takes .* got '12.7': '12.7' is not a non-negative integer"),
        (((True,), (4,), (0.5,)), r"merge_layers takes ints, got \(True,\): True is a bool"),
        (((12,), (4,), (False,)), r"merge_ratios takes floats, got \(False,\): False is a bool"),
        (((np.bool_(True),), (4,), (0.5,)), "merge_layers takes ints, .* is a bool"),
        (("true", "4", "0.5"), "merge_layers takes .* got 'true'"),
        (("12", "4", "nan"), "merge_ratios takes .* got 'nan'"),
        (("12", "4", "inf"), "merge_ratios takes .* got 'inf'"),
        (("12", "4", "1e999"), "merge_ratios takes .* got '1e999': '1e999' is too large"),
        (((12,), (4,), (float("nan"),)), "merge_ratios takes floats, got .*nan is not finite"),
        (((12,), (4,), (float("inf"),)), "merge_ratios takes floats, got .*inf is not finite"),
        (("12--18", "4-2", "0.5-0.5"), "merge_layers takes .* got '12--18': it holds '--'"),
        (("12,,18", "4,2", "0.5,0.5"), "merge_layers takes .* got '12,,18': it holds an empty item"),
        (("12-18-", "4-2", "0.5-0.5"), "merge_layers takes .* got '12-18-': it ends with '-'"),
        (("12,18,", "4,2", "0.5,0.5"), "merge_layers takes .* got '12,18,': it holds an empty item"),
        (("12-18,24", "4", "0.5"), "merge_layers takes .* got '12-18,24': '12-18' is not a non-negative integer"),
        (("", "4", "0.5"), "merge_layers needs at least one value, got ''"),
        (("12 18", "4", "0.5"), "merge_layers takes .* got '12 18'"),
        (("1_2", "4", "0.5"), "merge_layers takes .* got '1_2'"),
        (("\uff11\uff12", "4", "0.5"), "merge_layers takes .* is not a non-negative integer"),
        (("0x1f", "4", "0.5"), "merge_layers takes .* got '0x1f'"),
        ((None, "4", "0.5"), "merge_layers takes ints, got None: None is a NoneType, not a number"),
        ((("12",), "4", "0.5"), r"merge_layers takes ints, got \('12',\): '12' is a str, not a number"),
        (({12}, "4", "0.5"), r"merge_layers takes ints, got \{12\}: \{12\} is a set, not a number"),
        (("12-18-24", "4-2-1", "1.5"), r"merge_ratios must lie in \[0, 1\], got \(1.5,\)"),
        (("12-18-24", "4-2", "0.5"), r"need one entry per stage, got 3, 2 and 3 \(a single window or ratio"),
        (("12", "4-2", "0.5"), "need one entry per stage, got 1, 2 and 1"),
        (((), (4,), (0.5,)), "need one entry per stage, got 0, 1 and 1"),
    ],
)
def test_a_value_that_is_not_a_schedule_entry_is_refused_by_name(args, message):
    with pytest.raises(ValueError, match=message):
        LightKVConfig(*args)


@pytest.mark.parametrize(
    "args, expected",
    [
        (("12-18-24", "4-2-1", "0.3"), ((12, 18, 24), (4, 2, 1), (0.3, 0.3, 0.3))),
        (("12,18,24", "2", "0.5,0.25,0"), ((12, 18, 24), (2, 2, 2), (0.5, 0.25, 0.0))),
        ((12, 4, 0.5), ((12,), (4,), (0.5,))),
        (((12, 18), 4, 1), ((12, 18), (4, 4), (1.0, 1.0))),
        ((" 12 - 18 ", "4 , 2", "5e-1-1e-3"), ((12, 18), (4, 2), (0.5, 0.001))),
        (
            ((np.int64(12), np.int32(18)), np.array([4, 2]), (np.float64(0.5), np.float32(0.25))),
            ((12, 18), (4, 2), (0.5, 0.25)),
        ),
        ((np.int64(12), np.uint8(4), np.float16(0.5)), ((12,), (4,), (0.5,))),
        (((12,), (4,), (-0.0,)), ((12,), (4,), (0.0,))),
    ],
)
def test_schedules_in_every_form_and_a_single_window_or_ratio_for_every_stage(args, expected):
    config = LightKVConfig(*args)
    assert (config.merge_layers, config.merge_windows, config.merge_ratios) == expected
    assert config == LightKVConfig(*expected)
    assert {type(v) for v in config.merge_layers + config.merge_windows} == {int}
    assert {type(v) for v in config.merge_ratios} == {float}
