"""Bad input to a stage raises a ValueError/TypeError that names the problem."""

from __future__ import annotations

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
        ([(4.0, 68.0)], "integers"),
    ],
)
def test_bad_spans(spans, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lightkv_stage(*inputs(), spans, 2, 0.5)


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
