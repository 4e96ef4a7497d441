"""Where SGLang's LLaVA classes find each image's tokens (``lightkv_adapters.sglang.models.llava``): the square,
pooled, single-tile and anyres layouts of ``pad_input_ids``, through the shared ``lightkv_core.layouts``."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

if importlib.util.find_spec("sglang") is None:
    pytest.skip("SGLang is not installed", allow_module_level=True)

from lightkv_adapters.sglang import cpu_env  # noqa: E402

cpu_env.install()

from lightkv_adapters.sglang.models.llava import LlavaLlamaForCausalLM  # noqa: E402
from lightkv_core import layouts  # noqa: E402

SIDE = 4
PINPOINTS = [[56, 112], [112, 56], [112, 112]]  # tiles of 56 px (SIDE patches of 14 px)


def model(merge_type: str = "spatial_unpad") -> SimpleNamespace:
    """The attributes the span finder reads, as SGLang's LLaVA-NeXT sets them."""
    model = SimpleNamespace(
        num_patches_per_side=SIDE,
        mm_patch_merge_type=merge_type,
        image_grid_pinpoints=PINPOINTS,
        vision_tower=SimpleNamespace(config=SimpleNamespace(image_size=56)),
    )
    model.anyres_spans = lambda *args: LlavaLlamaForCausalLM.anyres_spans(model, *args)
    return model


def inputs(offsets: list[int], lengths: list[int], sizes: list | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        image_offsets=offsets, image_pad_len=lengths, mm_items=[SimpleNamespace(image_sizes=sizes or [])]
    )


def spans_of(model: SimpleNamespace, mm_inputs: SimpleNamespace, seq_len: int) -> list:
    return LlavaLlamaForCausalLM.image_spans(model, mm_inputs, seq_len)


def test_square_images_are_plain_grids():
    spans = spans_of(model("flat"), inputs([3, 30], [16, 16]), 50)
    assert [(s.start, s.end, s.rows, s.cols) for s in spans] == [(3, 19, 4, 4), (30, 46, 4, 4)]


def test_a_single_tile_image_is_its_base_grid_and_one_newline():
    (span,) = spans_of(model(), inputs([2], [SIDE * SIDE + 1]), 30)
    (expected,) = layouts.place(layouts.llava_next_image(SIDE, None), 2)
    assert (span.start, span.end) == (2, 2 + SIDE * SIDE + 1)
    assert span.mergeable.tolist() == expected.mergeable.tolist() == [True] * 16 + [False]


def test_an_anyres_image_is_base_grid_then_unpadded_grid_with_newlines():
    # a 112 x 56 (width x height) image picks the 112 x 56 pinpoint: 2 tiles wide, 1 high, nothing to unpad
    length = SIDE * SIDE + SIDE * (2 * SIDE + 1)
    base, high = spans_of(model(), inputs([1], [length], [(112, 56)]), length + 5)
    assert (base.start, base.end, base.rows, base.cols) == (1, 17, SIDE, SIDE)
    assert (high.start, high.end, high.rows, high.cols) == (17, 1 + length, SIDE, 2 * SIDE)
    assert int((~high.mergeable).sum()) == SIDE


def test_unknown_layouts_and_overlong_images_are_refused():
    with pytest.raises(NotImplementedError, match="layout"):
        spans_of(model("flat"), inputs([0], [17]), 30)
    with pytest.raises(ValueError, match="runs past"):
        spans_of(model(), inputs([20], [16]), 30)
