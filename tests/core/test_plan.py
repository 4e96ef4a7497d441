"""KV length plans (:mod:`lightkv_core.plan`) against what the stages and methods actually produce."""

from __future__ import annotations

import pytest
import torch
from helpers.stage_cases import build_case, image_layouts
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from lightkv_core import LengthPlan, LightKVConfig, VisionSpan, lightkv_stage, num_merged, plan_lengths
from lightkv_core.layouts import grid_with_row_newlines
from lightkv_core.methods import FastV, LightKV, RandomDrop
from lightkv_core.plan import least_removed, most_removed

pytestmark = pytest.mark.usefixtures("single_thread")

RATIOS = st.sampled_from([0.0, 0.25, 0.5, 0.7])
WINDOWS = st.integers(1, 6)


@st.composite
def samples(draw: st.DrawFn) -> tuple[list[VisionSpan], int]:
    """One sample's spans and length: 1-2 images (random grids, survivor subsets, shuffled coords,
    structural tokens), optionally followed by a LLaVA-NeXT style grid with a newline after every row."""
    layout = draw(image_layouts(min_images=1, max_images=2, min_side=1, max_side=20))
    case = build_case(
        layout, seed=draw(st.integers(0, 2**32 - 1)), window=1, ratio=0.0, dim=1, heads=1, kv_heads=1, head_dim=1
    )
    spans, seq_len = case.spans, case.hidden.shape[1]
    if draw(st.booleans()):
        spans.append(grid_with_row_newlines(draw(st.integers(1, 16)), draw(st.integers(1, 16)), start=seq_len))
        seq_len = spans[-1].end + draw(st.integers(1, 4))
    return spans, seq_len


@st.composite
def schedules(
    draw: st.DrawFn,
    windows: st.SearchStrategy[int] = WINDOWS,
    ratios: st.SearchStrategy[float] = RATIOS,
    layouts: tuple[str, ...] = ("default", "reference"),
) -> LightKVConfig:
    stages = draw(st.integers(1, 3))
    return LightKVConfig(
        merge_layers=tuple(range(stages)),
        merge_windows=tuple(draw(st.lists(windows, min_size=stages, max_size=stages))),
        merge_ratios=tuple(draw(st.lists(ratios, min_size=stages, max_size=stages))),
        layout=draw(st.sampled_from(layouts)),
    )


def actual_lengths(spans: list, seq_len: int, schedule: LightKVConfig, seed: int) -> list[int]:
    """Sequence length before the stages and after each one, running :func:`lightkv_stage` on random
    hidden states, queries and keys (torch backend, float32)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, seq_len, 8, generator=generator)
    lengths = [seq_len]
    for window, ratio in zip(schedule.merge_windows, schedule.merge_ratios, strict=True):
        length = hidden.shape[1]
        q = torch.randn(1, 2, length, 8, generator=generator)
        k = torch.randn(1, 1, length, 8, generator=generator)
        out = lightkv_stage(hidden, q, k, spans, window, ratio, layout=schedule.layout, backend="torch")
        hidden, spans = out.hidden, out.spans
        lengths.append(int(out.lengths[0]))
    return lengths


def assert_plan_holds(plan: LengthPlan, actual: list[int]) -> None:
    assert len(plan.lengths) == len(plan.lower) == len(actual)
    assert plan.lengths[0] == plan.lower[0] == actual[0]
    if plan.exact:
        assert list(plan.lengths) == actual
        assert plan.lower == plan.lengths
    for low, real, high in zip(plan.lower, actual, plan.lengths, strict=True):
        assert low <= real <= high
    assert list(plan.lengths) == sorted(plan.lengths, reverse=True)
    assert list(plan.lower) == sorted(plan.lower, reverse=True)


@settings(max_examples=60)
@given(sample=samples(), schedule=schedules(), seed=st.integers(0, 2**16))
def test_plan_matches_running_the_stages(sample, schedule, seed):
    spans, seq_len = sample
    plan = plan_lengths(spans, schedule, seq_len)
    actual = actual_lengths(spans, seq_len, schedule, seed)
    event(f"exact: {plan.exact}; merges: {actual[-1] < seq_len}")
    assert_plan_holds(plan, actual)
    assert LightKV(schedule).plan_lengths(spans, seq_len) == plan
    if schedule.layout == "reference":
        assert plan.exact


@settings(max_examples=40)
@given(
    side=st.tuples(st.integers(16, 26), st.integers(16, 26)),
    newlines=st.booleans(),
    schedule=schedules(windows=st.integers(2, 5), ratios=st.sampled_from([0.25, 0.5, 0.7]), layouts=("default",)),
    seed=st.integers(0, 2**16),
)
def test_bounds_hold_when_windows_do_not_nest(side, newlines, schedule, seed):
    """One large image and merging stages of 2-5 windows: band edges often stop nesting, so this mostly
    checks the bounds."""
    rows, cols = side
    image = grid_with_row_newlines(rows, cols, start=5) if newlines else VisionSpan(5, 5 + rows * cols, rows, cols)
    seq_len = image.end + 7
    plan = plan_lengths([image], schedule, seq_len)
    event(f"exact: {plan.exact}")
    assert_plan_holds(plan, actual_lengths([image], seq_len, schedule, seed))


@settings(max_examples=200)
@example(parts=[3, 3, 3, 3], ratio=0.3333333331)  # each window's 1e-9 slack rounds up: 4 > num_merged(r, 12) = 3
@given(
    parts=st.lists(st.integers(0, 60), min_size=1, max_size=9),
    ratio=st.sampled_from([0.0, 0.1, 0.25, 0.29, 0.3, 0.5, 0.7, 1.0]) | st.floats(0.0, 1.0),
)
def test_removal_bounds_hold_for_every_split(parts, ratio):
    """Whatever the split of ``n`` tokens over ``K`` windows, the tokens removed lie in the planner's
    bounds; one window is exact."""
    tokens, windows = sum(parts), len(parts)
    removed = sum(num_merged(ratio, n) for n in parts)
    assert least_removed(ratio, tokens, windows) <= removed <= most_removed(ratio, tokens, windows)
    assert least_removed(ratio, tokens, 1) == most_removed(ratio, tokens, 1) == num_merged(ratio, tokens)


@pytest.mark.parametrize(("layout", "vision"), [("default", [576, 288, 144, 72]), ("reference", [576, 288, 145, 73])])
def test_llava_preset_on_24x24_is_exact(layout, vision):
    text = 35 + 20
    schedule = LightKVConfig.preset("llava-1.5", layout=layout)
    plan = plan_lengths([(35, 35 + 576)], schedule, 35 + 576 + 20)
    assert plan.exact
    assert plan.lengths == plan.lower == tuple(text + v for v in vision)
    assert LightKV(schedule).plan_lengths([VisionSpan(35, 611, 24, 24)], 631) == plan


def test_qwen_preset_on_36x36_is_bounded_closely():
    """Windows 6 then 4 on 36 rows: band edges 6, 12, ... and 9, 18, ... do not nest, so after the first
    stage only bounds are known, and they stay within a few percent of the real lengths."""
    spans, seq_len = [(10, 10 + 36 * 36, 36, 36)], 10 + 36 * 36 + 15
    schedule = LightKVConfig.preset("qwen2.5-vl")
    plan = plan_lengths(spans, schedule, seq_len)
    actual = actual_lengths(spans, seq_len, schedule, seed=0)
    assert not plan.exact
    assert_plan_holds(plan, actual)
    assert plan.lengths[1] == plan.lower[1] == actual[1] == seq_len - 648
    for low, real, high in zip(plan.lower, actual, plan.lengths, strict=True):
        assert high <= 1.025 * real and low >= 0.975 * real
    assert plan_lengths(spans, LightKVConfig.preset("qwen2.5-vl", layout="reference"), seq_len).exact


def test_a_single_window_stage_keeps_the_plan_exact():
    """W = 1 nests in any earlier windows: 6 then 1 on 36x36 stays exact, then W = 2 does not."""
    spans, seq_len = [(4, 4 + 36 * 36)], 4 + 36 * 36 + 3
    assert plan_lengths(spans, LightKVConfig("1-2", "6-1", "0.5-0.5"), seq_len).exact
    assert not plan_lengths(spans, LightKVConfig("1-2-3", "6-1-2", "0.5-0.5-0.5"), seq_len).exact


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.75, 1.0])
@pytest.mark.parametrize(
    "method",
    [lambda ratio: FastV(1, ratio), lambda ratio: RandomDrop(-1, ratio, seed=3), lambda ratio: RandomDrop(2, ratio)],
)
def test_drop_method_plans_equal_their_reduce(method, ratio):
    method = method(ratio)
    spans = [VisionSpan(3, 3 + 49, 7, 7), grid_with_row_newlines(5, 6, start=60)]
    seq_len = spans[-1].end + 6
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, seq_len, 8, generator=generator)
    q, k = torch.randn(1, 2, seq_len, 8, generator=generator), torch.randn(1, 1, seq_len, 8, generator=generator)
    layer = method.reduce_layers[0]
    out = method.reduce(
        layer,
        hidden,
        None if layer < 0 else q,
        None if layer < 0 else k,
        [spans],
        position_ids=torch.arange(seq_len)[None],
        attention_mask=torch.ones(1, seq_len, dtype=torch.bool),
        padding_side="right",
    )
    plan = method.plan_lengths(spans, seq_len)
    assert plan.exact
    assert plan.lengths == (seq_len, int(out.lengths[0]))
    assert method.plan_lengths([], 9) == LengthPlan.exactly((9, 9))


@pytest.mark.parametrize(
    ("spans", "seq_len", "error", "message"),
    [
        ([(0, 16)], -1, ValueError, "seq_len must be >= 0"),
        ([(0, 16)], 20.0, TypeError, "seq_len must be an integer"),
        ([(5, 30)], 20, ValueError, "out of range for a sequence of 20 tokens"),
        ([(0, 16), (10, 19)], 30, ValueError, "must be sorted and must not overlap"),
        ([(0, 10)], 20, ValueError, "not a square number"),
        ([(0, 12, 3, 5)], 20, ValueError, "grid 3x5 has 15"),
        ([[(0, 16)]], 20, TypeError, "not a batch"),
        ((0, 16), 20, TypeError, r"spans\[0\] is int: a single span goes in a list"),
        (VisionSpan(0, 16, 4, 4), 20, TypeError, "list of one sample's vision spans"),
    ],
)
def test_bad_spans_or_length_are_named(spans, seq_len, error, message):
    with pytest.raises(error, match=message):
        plan_lengths(spans, LightKVConfig.preset("llava-1.5"), seq_len)
    with pytest.raises(error, match=message):
        FastV(1, 0.5).plan_lengths(spans, seq_len)


def test_schedule_must_be_a_config_and_plans_check_their_bounds():
    with pytest.raises(TypeError, match="schedule must be a LightKVConfig"):
        plan_lengths([(0, 16)], "llava-1.5", 20)
    with pytest.raises(ValueError, match="exact plan needs lower == lengths"):
        LengthPlan(lengths=(10, 8), exact=True, lower=(10, 7))
    with pytest.raises(ValueError, match="exceeds lengths"):
        LengthPlan(lengths=(10, 8), exact=False, lower=(10, 9))


def test_only_an_exact_plan_of_the_whole_prompt_in_every_group_keeps_every_token():
    """A text-only sample keeps every token (the SGLang pools share its slots with the radix tree); a plan that
    drops tokens, or only bounds the groups by the prompt length, does not."""
    assert LightKV(LightKVConfig.preset("llava-1.5")).plan_lengths([], 40).keeps_every_token
    assert FastV(1, 0.5).plan_lengths([], 40).keeps_every_token
    assert not FastV(1, 0.5).plan_lengths([(0, 16)], 40).keeps_every_token
    assert not LengthPlan(lengths=(10, 10), exact=False, lower=(10, 9)).keeps_every_token
