"""Schedules: parsing, validation and the released presets."""

from __future__ import annotations

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
        (("12-x-24", "4-2-1", "0.5-0.5-0.5"), "cannot parse"),
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
