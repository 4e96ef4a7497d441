"""Bad input to a stage raises a ValueError/TypeError that names the problem."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from lightkv_core import VisionSpan, lightkv_stage

SEQ = 80


def inputs(heads: int = 4, kv_heads: int = 2, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, SEQ, 8, generator=generator).to(dtype)
    q = torch.randn(1, heads, SEQ, 8, generator=generator).to(dtype)
    k = torch.randn(1, kv_heads, SEQ, 8, generator=generator).to(dtype)
    return hidden, q, k


GOOD_SPANS = [(4, 68, 8, 8)]


@pytest.mark.parametrize(
    "spans, match",
    [
        ([(60, 90, 5, 6)], "out of range"),
        ([(-1, 63, 8, 8)], "out of range"),
        ([(4, 68, 8, 8), (60, 76, 4, 4)], "overlap"),
        ([(40, 56, 4, 4), (4, 20, 4, 4)], "sorted"),
        ([(4, 68, 8, 9)], "grid"),
        ([(4, 66)], "square"),
        ([(4, 68, 0, 8)], "grid"),
        ([VisionSpan(4, 20, 8, 8, coords=torch.arange(15))], "coords"),
        ([VisionSpan(4, 20, 8, 8, coords=torch.arange(16) + 60)], "coords"),
        ([VisionSpan(4, 20, 8, 8, coords=torch.zeros(16, dtype=torch.long))], "repeat"),
        ([(4.0, 68.0)], r"start must be an integer, got 4\.0"),
        ([(True, 5, 2, 2)], r"vision span \(True, 5, 2, 2\): start must be an integer, got True"),
        ([(4, 68, True, 8)], "rows must be an integer, got True"),
        ([(4, 68, 8.0, 8)], r"rows must be an integer, got 8\.0"),
        ([(4, 68, 8, np.float64(8))], r"cols must be an integer, got np.float64\(8\.0\)"),
        ([(np.True_, 5, 2, 2)], "start must be an integer, got np.True_"),
        ([(4, torch.tensor(68.0))], "end must be an integer"),
        ([VisionSpan(4, 20, 4, 4, coords=torch.arange(16.0))], "coords must be an integer tensor, got torch.float32"),
        ([VisionSpan(4, 20, 4, 4, mergeable=torch.ones(16, dtype=torch.long))], "mergeable must be a bool tensor"),
    ],
)
def test_bad_spans(spans, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lightkv_stage(*inputs(), spans, 2, 0.5)


@pytest.mark.parametrize("field, value", [("start", True), ("rows", 8.0), ("cols", np.bool_(False))])
def test_a_vision_span_is_built_of_integers(field, value):
    fields = {"start": 4, "end": 68, "rows": 8, "cols": 8, field: value}
    with pytest.raises(TypeError, match=f"VisionSpan: {field} must be an integer, got {value!r}"):
        VisionSpan(**fields)


def test_numpy_integers_are_span_integers():
    """Spans built from NumPy arrays hold NumPy integers: the same stage as Python integers."""
    reference = lightkv_stage(*inputs(), [(4, 68, 8, 8)], 2, 0.5)
    for spans in (
        [tuple(np.array([4, 68, 8, 8]))],
        [tuple(np.array([4, 68], dtype=np.int32))],
        [(4, 68, np.int16(8), torch.tensor(8))],
        [VisionSpan(np.int64(4), np.int64(68), np.uint8(8), 8)],
    ):
        result = lightkv_stage(*inputs(), spans, 2, 0.5)
        assert torch.equal(result.hidden, reference.hidden)
        assert [(s.start, s.end, s.rows, s.cols) for s in result.spans] == [(4, 36, 8, 8)]
        assert all(type(value) is int for value in (result.spans[0].start, result.spans[0].rows))


@pytest.mark.parametrize("scale", [-1, -0.125, 0, 0.0, float("nan"), float("inf"), float("-inf")], ids=repr)
@pytest.mark.parametrize("guide", ["all_text", "none"])
def test_scale_must_be_finite_and_positive(scale, guide):
    """A negative scale reverses the guidance, 0 makes it uniform; refused even where no score is computed."""
    with pytest.raises(ValueError, match=re.escape(f"lightkv_stage: scale must be a finite number > 0, got {scale!r}")):
        lightkv_stage(*inputs(), GOOD_SPANS, 2, 0.5, scale=scale, guide=guide)


@pytest.mark.parametrize("scale", [True, "0.5", torch.tensor(0.5)], ids=["bool", "str", "tensor"])
def test_scale_must_be_a_number(scale):
    with pytest.raises(TypeError, match="lightkv_stage: scale must be a real number"):
        lightkv_stage(*inputs(), GOOD_SPANS, 2, 0.5, scale=scale)


def test_zero_width_and_headless_inputs():
    hidden, q, k = inputs()
    with pytest.raises(ValueError, match=r"hidden must have a width D >= 1, got shape \(1, 80, 0\)"):
        lightkv_stage(hidden[..., :0], q, k, GOOD_SPANS, 2, 0.5)
    with pytest.raises(ValueError, match=r"q needs at least one head of size d >= 1, got shape \(1, 0, 80, 8\)"):
        lightkv_stage(hidden, q[:, :0], k, GOOD_SPANS, 2, 0.5)
    with pytest.raises(ValueError, match=r"q needs at least one head of size d >= 1, got shape \(1, 4, 80, 0\)"):
        lightkv_stage(hidden, q[..., :0], k[..., :0], GOOD_SPANS, 2, 0.5)


@pytest.mark.parametrize("mrope", [False, True], ids=["1d", "mrope"])
def test_negative_position_ids_of_real_tokens(mrope):
    """Decided from the stage's one read of the device, as the mask is."""
    positions = torch.arange(SEQ)[None] - 5
    if mrope:
        positions = torch.stack([torch.arange(SEQ)[None], positions, torch.arange(SEQ)[None]])
    with pytest.raises(ValueError, match="position_ids of real tokens must be >= 0, got -5"):
        lightkv_stage(*inputs(), GOOD_SPANS, 2, 0.5, position_ids=positions)
    with pytest.raises(ValueError, match="position_ids of real tokens must be >= 0, got -5"):
        lightkv_stage(*inputs(), [], 2, 0.5, position_ids=positions)  # nothing merges
    # position ids of padding are never read: left padding may carry any (``cumsum - 1`` gives -1 there)
    mask = torch.arange(SEQ)[None] >= 5
    result = lightkv_stage(*inputs(), [(8, 72, 8, 8)], 2, 0.5, position_ids=positions, attention_mask=mask)
    assert int(result.positions.min()) >= 0


def test_position_ids_must_be_integers():
    with pytest.raises(TypeError, match="position_ids must be an integer tensor, got torch.bool"):
        lightkv_stage(*inputs(), GOOD_SPANS, 2, 0.5, position_ids=torch.ones(1, SEQ, dtype=torch.bool))


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValueError, match="ratio"):
        lightkv_stage(*inputs(), GOOD_SPANS, 2, ratio)


@pytest.mark.parametrize("window, error", [(0, ValueError), (-2, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_window(window, error):
    with pytest.raises(error, match="window"):
        lightkv_stage(*inputs(), GOOD_SPANS, window, 0.5)


def test_heads_not_dividing():
    with pytest.raises(ValueError, match="multiple"):
        lightkv_stage(*inputs(heads=4, kv_heads=3), GOOD_SPANS, 2, 0.5)


# The stage decides finiteness from its one read of the device, after the kernels ran on the bad values.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("tensor, token", [("q", 10), ("q", 75), ("k", 75)])
def test_nan_in_scores(tensor, token):
    """Any query row and the keys of guide tokens (here 75, after the image) feed the scores."""
    hidden, q, k = inputs()
    (q if tensor == "q" else k)[0, 1, token, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite cross-attention scores"):
        lightkv_stage(hidden, q, k, GOOD_SPANS, 2, 0.5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_inf_in_hidden():
    hidden, q, k = inputs()
    hidden[0, 10, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite hidden"):
        lightkv_stage(hidden, q, k, GOOD_SPANS, 2, 0.5)


def test_shapes_and_dtypes():
    hidden, q, k = inputs()
    with pytest.raises(ValueError, match="hidden"):
        lightkv_stage(hidden[0], q, k, GOOD_SPANS, 2, 0.5)
    with pytest.raises(ValueError, match="q must be"):
        lightkv_stage(hidden, q[:, :, :-1], k, GOOD_SPANS, 2, 0.5)
    with pytest.raises(ValueError, match="k must be"):
        lightkv_stage(hidden, q, k[..., :-1], GOOD_SPANS, 2, 0.5)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        lightkv_stage(hidden.long(), q, k, GOOD_SPANS, 2, 0.5)


def test_bad_options_and_batches():
    hidden, q, k = inputs()
    with pytest.raises(ValueError, match="guide"):
        lightkv_stage(hidden, q, k, GOOD_SPANS, 2, 0.5, guide="text")
    with pytest.raises(ValueError, match="layout"):
        lightkv_stage(hidden, q, k, GOOD_SPANS, 2, 0.5, layout="square")
    with pytest.raises(ValueError, match="positions"):
        lightkv_stage(hidden, q, k, GOOD_SPANS, 2, 0.5, positions="relative")
    with pytest.raises(ValueError, match="per-sample"):
        lightkv_stage(hidden, q, k, [GOOD_SPANS, GOOD_SPANS], 2, 0.5)
    batch = [t.expand(2, *t.shape[1:]) for t in (hidden, q, k)]
    with pytest.raises(ValueError, match="one list of spans per sample"):
        lightkv_stage(*batch, GOOD_SPANS, 2, 0.5)
    holes = torch.ones(2, SEQ, dtype=torch.bool)
    holes[0, 30] = False
    with pytest.raises(ValueError, match="contiguous"):
        lightkv_stage(*batch, [GOOD_SPANS, GOOD_SPANS], 2, 0.5, attention_mask=holes)
    right_padded = torch.ones(2, SEQ, dtype=torch.bool)
    right_padded[1, 60:] = False
    with pytest.raises(ValueError, match="padding"):
        lightkv_stage(*batch, [GOOD_SPANS, GOOD_SPANS], 2, 0.5, attention_mask=right_padded)


@pytest.mark.parametrize("guide, spans", [("all_text", [(0, 80, 8, 10)]), ("prompt", [(0, 16, 4, 4), (16, 80, 8, 8)])])
def test_no_guide_tokens(guide, spans):
    with pytest.raises(ValueError, match="no guide tokens"):
        lightkv_stage(*inputs(), spans, 2, 0.5, guide=guide)
