"""The method interface of the in-prefill methods (LightKV, FastV, RandomDrop): constructor validation,
``PrefillReduction`` and ``reduce_layers``, LightKV's ``reduce`` against the stage, span forms, and the layer
and positions checks."""

from __future__ import annotations

import pytest
import torch
from helpers.drop_cases import one_image_batch, run_method

from lightkv_core import LightKVConfig, lightkv_stage
from lightkv_core.methods import FastV, LightKV, PrefillReduction, RandomDrop

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------------------
# 1. Constructors and the schedule


@pytest.mark.parametrize(
    "make",
    [
        lambda: FastV(0, -0.1),
        lambda: FastV(0, 1.5),
        lambda: FastV(-1, 0.5),
        lambda: FastV(0, 0.5, scoring="max"),
        lambda: RandomDrop(0, -0.01),
        lambda: RandomDrop(0, 1.01),
        lambda: RandomDrop(-2, 0.5),
    ],
)
def test_constructor_validation(make):
    with pytest.raises(ValueError):
        make()


def test_valid_constructors_and_interface():
    for method in (
        FastV(0, 0.0),
        FastV(3, 1.0, scoring="all_tokens"),
        RandomDrop(0, 0.5),
        LightKV(LightKVConfig.preset("llava-1.5")),
    ):
        assert isinstance(method, PrefillReduction)
    assert LightKV(LightKVConfig((1, 3), (2, 1), (0.5, 0.5))).reduce_layers == (1, 3)
    assert RandomDrop(4, 0.5).reduce_layers == (4,)


def test_lightkv_reduce_matches_the_stage_and_rejects_other_layers():
    inputs = one_image_batch(seed=3)
    method = LightKV(LightKVConfig((1, 3), (2, 1), (0.5, 0.25)), backend="torch")
    for layer, window, ratio in ((1, 2, 0.5), (3, 1, 0.25)):
        got = run_method(method, inputs, "left", layer)
        expected = lightkv_stage(
            inputs["hidden"],
            inputs["q"],
            inputs["k"],
            inputs["spans"],
            window,
            ratio,
            position_ids=inputs["position_ids"],
            padding_side="left",
            backend="torch",
        )
        assert torch.equal(got.hidden, expected.hidden)
        assert got.lengths.tolist() == expected.lengths.tolist() == [71 - int(64 * ratio)]
    for layer in (0, 2, 4):
        with pytest.raises(ValueError, match="merge_layers"):
            run_method(method, inputs, "left", layer)


# ----------------------------------------------------------------------------------------------
# 2. Span forms, positions and layers of the dropping methods


@pytest.mark.parametrize("method", [FastV(0, 0.5), RandomDrop(0, 0.5)], ids=["fastv", "random"])
@pytest.mark.parametrize("form", ["batch", "single"])
def test_dropping_methods_accept_tuple_spans(method, form):
    inputs = one_image_batch()
    span = (3, 67, 8, 8)
    inputs["spans"] = [[span]] if form == "batch" else [span]
    result = run_method(method, inputs)
    assert int(result.lengths[0]) == inputs["hidden"].shape[1] - 32


@pytest.mark.parametrize("cls", [FastV, RandomDrop])
def test_dropping_methods_check_positions_and_layer(cls):
    with pytest.raises(ValueError, match="positions must be one of"):
        cls(0, 0.5, positions="bad")
    inputs = one_image_batch()
    with pytest.raises(ValueError, match="layer 1 is not one of this method's layers"):
        run_method(cls(0, 0.5), inputs, "left", layer=1)
