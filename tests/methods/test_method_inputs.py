"""Every method refuses a bad setting when it is built (a message naming the method, the field and the value), and
bad inputs when it runs: a softmax scale that is not finite and positive, negative position ids of real tokens, a
hidden width of 0, booleans where span integers belong."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers.drop_cases import one_image_batch, run_method

from lightkv_core import LightKVConfig, drop_tokens
from lightkv_core.methods import (
    AirCache,
    FastV,
    LightKV,
    LookM,
    PrefixKV,
    RandomDrop,
    UnguidedMerge,
    mean_received_attention,
    method_by_name,
)
from lightkv_core.methods.received import received_attention

pytestmark = pytest.mark.usefixtures("single_thread")

NAN, INF = float("nan"), float("inf")


# ----------------------------------------------------------------------------------------------
# 1. Settings, checked in __post_init__


BAD_SETTINGS = {
    # name: (build, error, message)
    "fastv-layer-bool": (lambda: FastV(True, 0.5), TypeError, "FastV: layer must be an integer, got True"),
    "fastv-layer-float": (lambda: FastV(1.5, 0.5), TypeError, "FastV: layer must be an integer, got 1.5"),
    "fastv-layer-negative": (lambda: FastV(-1, 0.5), ValueError, "FastV: layer must be >= 0, got -1"),
    "fastv-ratio-nan": (lambda: FastV(0, NAN), ValueError, "FastV: ratio must lie in [0, 1], got nan"),
    "fastv-ratio-inf": (lambda: FastV(0, INF), ValueError, "FastV: ratio must lie in [0, 1], got inf"),
    "fastv-ratio-1.5": (lambda: FastV(0, 1.5), ValueError, "FastV: ratio must lie in [0, 1], got 1.5"),
    "fastv-ratio-bool": (lambda: FastV(0, True), TypeError, "FastV: ratio must be a number, got True"),
    "fastv-ratio-str": (lambda: FastV(0, "0.5"), TypeError, "FastV: ratio must be a number, got '0.5'"),
    "fastv-backend": (lambda: FastV(0, 0.5, backend="cuda"), ValueError, "FastV: backend must be one of"),
    "random-layer-bool": (lambda: RandomDrop(True, 0.5), TypeError, "RandomDrop: layer must be an integer"),
    "random-layer-low": (lambda: RandomDrop(-2, 0.5), ValueError, "RandomDrop: layer must be >= -1, got -2"),
    "random-ratio-nan": (lambda: RandomDrop(0, NAN), ValueError, "RandomDrop: ratio must lie in [0, 1], got nan"),
    "random-seed-float": (lambda: RandomDrop(0, 0.5, seed=1.5), TypeError, "RandomDrop: seed must be an integer"),
    "random-seed-bool": (lambda: RandomDrop(0, 0.5, seed=True), TypeError, "RandomDrop: seed must be an integer"),
    "random-seed-huge": (lambda: RandomDrop(0, 0.5, seed=2**64), ValueError, "RandomDrop: seed must be in"),
    "prefixkv-retention-bool": (lambda: PrefixKV(retention=True), TypeError, "PrefixKV: retention must be a number"),
    "prefixkv-retention-nan": (lambda: PrefixKV(retention=NAN), ValueError, "PrefixKV: retention must lie in [0, 1]"),
    "prefixkv-sink-float": (lambda: PrefixKV(sink=1.5), TypeError, "PrefixKV: sink must be an integer, got 1.5"),
    "prefixkv-sink-bool": (lambda: PrefixKV(sink=True), TypeError, "PrefixKV: sink must be an integer, got True"),
    "prefixkv-fractions-nan": (
        lambda: PrefixKV(fractions=(0.5, NAN)),
        ValueError,
        "PrefixKV: fractions[1] must lie in [0, 1], got nan",
    ),
    "prefixkv-fractions-bool": (
        lambda: PrefixKV(fractions=(True,)),
        TypeError,
        "PrefixKV: fractions[0] must be a number, got True",
    ),
    "prefixkv-fractions-number": (lambda: PrefixKV(fractions=0.5), TypeError, "PrefixKV: fractions must be a"),
    "prefixkv-fractions-empty": (lambda: PrefixKV(fractions=()), TypeError, "PrefixKV: fractions must be a non-empty"),
    "prefixkv-backend": (lambda: PrefixKV(backend="gpu"), ValueError, "PrefixKV: backend must be one of"),
    "aircache-alpha-bool": (lambda: AirCache(alpha=True), TypeError, "AirCache: alpha must be a number, got True"),
    "aircache-alpha-nan": (lambda: AirCache(alpha=NAN), ValueError, "AirCache: alpha must lie in (0, 1], got nan"),
    "aircache-retention-bool": (lambda: AirCache(retention=False), TypeError, "AirCache: retention must be a number"),
    "aircache-backend": (lambda: AirCache(backend=None), ValueError, "AirCache: backend must be one of"),
    "lookm-recent-float": (lambda: LookM(recent=2.5), TypeError, "LookM: recent must be an integer, got 2.5"),
    "lookm-recent-bool": (lambda: LookM(recent=True), TypeError, "LookM: recent must be an integer, got True"),
    "lookm-retention-bool": (lambda: LookM(retention=True), TypeError, "LookM: retention must be a number"),
    "lookm-backend": (lambda: LookM(backend="cpu"), ValueError, "LookM: backend must be one of"),
    "lightkv-config": (lambda: LightKV("llava-1.5"), TypeError, "LightKV: config must be a LightKVConfig, got str"),
    "lightkv-backend": (
        lambda: LightKV(LightKVConfig.preset("llava-1.5"), backend="gpu"),
        ValueError,
        "LightKV: backend must be one of",
    ),
    "unguided-backend": (
        lambda: UnguidedMerge(LightKVConfig.preset("llava-1.5"), backend="gpu"),
        ValueError,
        "UnguidedMerge: backend must be one of",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_SETTINGS))
def test_bad_settings_are_refused_naming_the_field(name):
    build, error, message = BAD_SETTINGS[name]
    with pytest.raises(error, match=re.escape(message)):
        build()


def test_numpy_settings_are_accepted():
    """Settings read from NumPy arrays (e.g. a sweep) are integers and numbers like Python's."""
    assert FastV(np.int64(2), np.float64(0.5)) == FastV(2, 0.5)
    assert RandomDrop(np.int32(-1), np.float32(0.25), seed=np.uint32(7)).reduce_layers == (-1,)
    assert PrefixKV(retention=np.float64(0.3), sink=np.int64(2), fractions=[0.5, np.float32(0.25)]).fractions == (
        0.5,
        0.25,
    )
    assert LookM(recent=np.int16(4)).recent == 4


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: method_by_name("fastv", 32, retention=NAN), ValueError, "retention must lie in [0, 1], got nan"),
        (lambda: method_by_name("random", 32, retention=True), TypeError, "retention must be a number, got True"),
        (lambda: method_by_name("prefixkv", 0), ValueError, "num_layers must be >= 1, got 0"),
        (lambda: method_by_name("fastv", 2.5), TypeError, "num_layers must be an integer, got 2.5"),
        (lambda: method_by_name("fastv", 1, retention=0.5), ValueError, "retention 0.5 is out of reach"),
    ],
    ids=["fastv-nan", "random-bool", "prefixkv-no-layers", "fastv-float-layers", "fastv-one-layer"],
)
def test_method_by_name_checks_depth_and_retention(call, error, message):
    """A NaN retention used to build FastV with ratio 0 (min(1.0, nan) is 1.0); one layer divided by zero."""
    with pytest.raises(error, match=re.escape(message)):
        call()


# ----------------------------------------------------------------------------------------------
# 2. Inputs, checked when a method runs


@pytest.mark.parametrize("scale", [-1.0, 0.0, NAN, INF], ids=repr)
def test_received_attention_refuses_a_bad_scale(scale):
    inputs = one_image_batch()
    for run in (
        lambda: received_attention(inputs["q"], inputs["k"], inputs["mask"], scale=scale, backend="torch"),
        lambda: mean_received_attention(
            inputs["q"], inputs["k"], inputs["mask"], last_token_only=True, scale=scale, backend="torch"
        ),
    ):
        with pytest.raises(ValueError, match=re.escape(f"scale must be a finite number > 0, got {scale!r}")):
            run()


@pytest.mark.parametrize(
    "method",
    [FastV(0, 0.5, backend="torch"), RandomDrop(0, 0.5), LightKV(LightKVConfig((0,), (2,), (0.5,)), backend="torch")],
    ids=["fastv", "random", "lightkv"],
)
def test_prefill_methods_refuse_negative_position_ids_of_real_tokens(method):
    inputs = one_image_batch()
    inputs["position_ids"] = inputs["position_ids"] - 3
    with pytest.raises(ValueError, match="position_ids of real tokens must be >= 0, got -3"):
        run_method(method, inputs)


@pytest.mark.parametrize("method", [FastV(0, 0.5, backend="torch"), RandomDrop(0, 0.5)], ids=["fastv", "random"])
def test_dropping_methods_refuse_boolean_span_fields(method):
    inputs = one_image_batch()
    inputs["spans"] = [[(3, 67, True, 64)]]
    with pytest.raises(TypeError, match=re.escape("vision span (3, 67, True, 64): rows must be an integer, got True")):
        run_method(method, inputs)
    with pytest.raises(TypeError, match="start must be an integer, got True"):
        method.plan_lengths([(True, 5, 2, 2)], 10)


def test_drop_tokens_refuses_zero_width_and_negative_positions():
    hidden = torch.randn(1, 6, 3)
    keep = torch.ones(1, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"hidden must be \(B, S, D\) with D >= 1, got shape \(1, 6, 0\)"):
        drop_tokens(hidden[..., :0], keep, [(1, 5, 2, 2)])
    positions = torch.tensor([[0, 1, 2, -4, 4, 5]])
    with pytest.raises(ValueError, match="position_ids of real tokens must be >= 0, got -4"):
        drop_tokens(hidden, keep, [(1, 5, 2, 2)], position_ids=positions)
    mask = torch.tensor([[False, True, True, True, True, True]])
    positions[0, 3] = 3
    positions[0, 0] = -1  # padding: never read
    assert drop_tokens(hidden, keep, [(1, 5, 2, 2)], position_ids=positions, attention_mask=mask).lengths.tolist() == [
        5
    ]
