"""plan_stage: the kernel arguments it plans, run through the public kernels and compaction, are the stage."""

from __future__ import annotations

import pytest
import torch
from helpers.stage_cases import build_case, image_layouts
from hypothesis import given, settings
from hypothesis import strategies as st

from lightkv_core import lightkv_stage, plan_stage
from lightkv_core.compaction import merge_arguments
from lightkv_core.kernels import cross_attention_scores, merge_compact, window_best_match
from lightkv_core.windows import choose_merges


@settings(max_examples=10)
@given(
    layout=image_layouts(min_images=1, max_images=2, min_side=4, max_side=10),
    seed=st.integers(0, 2**32 - 1),
    guide=st.sampled_from(["all_text", "prompt", "none"]),
    padding_side=st.sampled_from(["left", "right"]),
)
def test_planned_arguments_reproduce_the_stage(backend, device, layout, seed, guide, padding_side):
    case = build_case(layout, seed=seed, window=2, ratio=0.5, dim=12, heads=4, kv_heads=2, head_dim=8)
    hidden, q, k = (t.to(device) for t in (case.hidden, case.q, case.k))
    options = dict(guide=guide, padding_side=padding_side)
    stage = lightkv_stage(hidden, q, k, case.spans, case.window, case.ratio, backend=backend, **options)
    plan = plan_stage(hidden, q, k, case.spans, case.window, case.ratio, **options)
    seq = hidden.shape[1]
    if plan.match_arguments is None:
        assert bool((stage.merged_into == -1).all()) and stage.scores is None
        return
    assert (plan.score_arguments is None) == (guide == "none")
    scores = None if guide == "none" else cross_attention_scores(*plan.score_arguments, backend=backend)
    best, sim = window_best_match(*plan.match_arguments, backend=backend)
    merged_into = choose_merges(plan.windows, best, sim, 1, seq)
    assert torch.equal(merged_into, stage.merged_into)
    keep = plan.real & (merged_into < 0)
    arguments = merge_arguments(hidden, keep, merged_into, scores, padding_side)
    merged = merge_compact(*arguments, backend=backend).view(1, -1, hidden.shape[2])
    assert torch.equal(merged, stage.hidden)
    if scores is not None:
        assert torch.equal(scores, stage.scores)


def test_plan_refuses_a_tensor_as_the_positions_mode():
    hidden, q = torch.randn(1, 20, 8), torch.randn(1, 2, 20, 4)
    with pytest.raises(TypeError, match="position_ids"):
        plan_stage(hidden, q, q, [(2, 18, 4, 4)], 1, 0.5, positions=torch.arange(20)[None])
