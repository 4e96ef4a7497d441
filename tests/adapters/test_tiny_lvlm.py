"""The shapes world, the shipped tiny LVLM, the retention planning of the quality benchmark, and the
``lightkv demo`` / ``lightkv eval`` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightkv_adapters.reference import shapes_world as world
from lightkv_adapters.reference.quality import (
    build_method,
    held_out,
    lightkv_schedule,
    planned_retention,
    score,
)
from lightkv_adapters.reference.tiny_lvlm import WEIGHTS, TinyLVLM
from lightkv_core.cli import main
from lightkv_core.config import LightKVConfig
from lightkv_core.methods import LightKV
from lightkv_core.methods.fastv import drop_ratio, released_layer


@pytest.fixture(scope="module")
def model() -> TinyLVLM:
    torch.manual_seed(0)
    return TinyLVLM.load()


def test_examples_are_a_pure_function_of_the_seed():
    a, b = world.make_example(7), world.make_example(7)
    assert np.array_equal(a.image, b.image) and a.questions == b.questions and a.objects == b.objects
    assert not np.array_equal(a.image, world.make_example(8).image)
    assert a.image.shape == (64, 64, 3) and a.image.dtype == np.float32


def test_vocabulary_round_trip_and_unknown_words():
    words = ("what", "colour", "is", "the", "object", "left", "of", "the", "red", "object", "?")
    assert world.decode(world.encode(words) + world.encode(("blue", ".", "red"))) == words + ("blue", ".")
    with pytest.raises(ValueError, match="'mauve' is not in the shapes-world vocabulary"):
        world.encode(("mauve",))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**6))
def test_answers_follow_from_the_scene(seed):
    example = world.make_example(seed)
    objects = example.objects
    cells = {o.cell for o in objects}
    assert len(cells) == len(objects) and world.MIN_OBJECTS <= len(objects) <= world.MAX_OBJECTS
    assert len({o.colour for o in objects}) == len(objects)
    for question in example.questions:
        assert question.words[-1] == "?" and question.answer[-1] == "."
        assert len(question.answer) <= world.MAX_ANSWER_WORDS
        if question.kind == "relation":
            relation, colour = question.words[-6], question.words[-3]
            anchor = next(o for o in objects if o.colour == colour)
            dr, dc = world.RELATIONS[relation]
            neighbour = next(o for o in objects if o.cell == (anchor.cell[0] + dr, anchor.cell[1] + dc))
            assert question.answer == (neighbour.colour, ".")
        elif question.kind == "describe":
            target = next(o for o in objects if o.colour == question.words[2])
            assert question.answer == (world.SIZES[target.size - 1], target.colour, target.shape, ".")
        elif question.kind in ("size", "shape"):
            target = next(o for o in objects if o.colour == question.words[4])
            expected = world.SIZES[target.size - 1] if question.kind == "size" else target.shape
            assert question.answer == (expected, ".")
        else:
            count = sum(o.shape == question.words[2] for o in objects)
            assert question.answer == (str(count), ".")


def test_objects_are_drawn_where_the_scene_says():
    example = world.make_example(3)
    patches = world.patchify(example.image[None])[0].reshape(world.GRID, world.GRID, world.PATCH, world.PATCH, 3)
    for obj in example.objects:
        top = obj.cell[0] * world.CELL_PATCHES + obj.offset[0]
        left = obj.cell[1] * world.CELL_PATCHES + obj.offset[1]
        patch = patches[top, left]
        glyph = world.GLYPHS[obj.shape]
        assert np.abs(patch[glyph] - np.array(world.COLOURS[obj.colour])).max() <= 0.05 + 1e-6


def test_shipped_weights_are_small_and_load(model):
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size <= 20 * 1024 * 1024
    assert model.config.num_layers >= 8
    with pytest.raises(FileNotFoundError, match="no tiny-LVLM weights"):
        TinyLVLM.load(WEIGHTS.with_name("missing.safetensors"))


def test_shipped_model_answers_held_out_questions(model):
    result = score(model, held_out(10), None, batch=50)
    assert result.accuracy >= 0.9, result.per_type
    assert result.retention == 1.0


def test_planned_retention_matches_the_decoder(model):
    config = LightKVConfig("3-4-6", "4-2-1", "0.5-0.5-0.5")
    pairs = held_out(2)
    measured = score(model, pairs, LightKV(config, backend="torch"), batch=8).retention
    assert measured == pytest.approx(planned_retention(config, 8, (16, 16)), abs=1e-12)


@pytest.mark.parametrize("target", [0.75, 0.55, 0.35, 0.25])
def test_lightkv_schedule_meets_its_target(target):
    config = lightkv_schedule(8, target, (16, 16))
    assert config is not None and all(0.0 <= r <= 0.5 for r in config.merge_ratios)
    planned = planned_retention(config, 8, (16, 16))
    assert planned <= target + 0.01
    assert planned > target - 0.1


def test_out_of_reach_targets_are_none_not_clamped():
    assert lightkv_schedule(8, 0.15, (16, 16)) is None
    assert build_method("lightkv", 8, 0.15, (16, 16)) is None
    assert drop_ratio(8, 3, 0.25) is None
    assert released_layer(32) == 1 and released_layer(8) == 0
    assert drop_ratio(8, 0, 0.25) == pytest.approx(1 - 1 / 7)


def test_demo_command_runs(capsys):
    assert main(["demo", "--show", "1", "--per-type", "2", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "KV tokens per layer" in out and "LightKV" in out and "accuracy" in out


def test_eval_command_writes_its_summary(tmp_path, capsys):
    args = ["eval", "--per-type", "2", "--methods", "lightkv,fastv", "--retentions", "0.55,0.15"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "quality.json").read_text())
    assert 0.0 <= summary["full"] <= 1.0 and summary["questions"] == 2 * len(world.QUESTION_TYPES)
    assert set(summary["methods"]) == {"lightkv", "fastv"}
    assert summary["command"] == "lightkv " + " ".join([*args, "--out", str(tmp_path)])
    assert set(summary["methods"]["lightkv"]) == {"0.55", "0.15"}
    assert summary["methods"]["lightkv"]["0.15"] is None
    assert 0.0 <= summary["methods"]["fastv"]["0.15"] <= 1.0
    assert summary["measured_retention"]["fastv"]["0.55"] == pytest.approx(0.55, abs=0.01)
    assert (tmp_path / "quality.png").stat().st_size > 0


def test_calibrate_writes_fractions_that_calibrated_prefixkv_uses(tmp_path, model, capsys):
    from lightkv_core.methods import PrefixKV

    path = tmp_path / "calibration.json"
    arguments = ["calibrate", "--prompts", "6", "--batch", "4", "--retention", "0.3", "--backend", "torch"]
    arguments += ["--out", str(path)]
    assert main(arguments) == 0
    assert "wrote" in capsys.readouterr().out
    method = PrefixKV.from_calibration(path, retention=0.2, backend="torch")
    assert len(method.fractions) == model.config.num_layers and method.retention == 0.2
    pairs = held_out(1)[:4]
    _, stats = model.answer([e for e, _ in pairs], [q for _, q in pairs], method)
    candidates = stats.original_vision_tokens - 3  # the first three image tokens are among the 4 sinks
    assert (stats.vision_tokens.sum(dim=0) - 3 * model.config.num_layers).tolist() == [
        round(0.2 * n * model.config.num_layers) for n in candidates.tolist()
    ]
    assert main(["calibrate", "--prompts", "0", "--out", str(path)]) == 2
