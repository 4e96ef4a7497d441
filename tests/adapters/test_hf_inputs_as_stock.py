"""Inputs the stock model accepts behave as stock under the transformers adapter, and applying it is atomic.

Each test reproduces, with the project's own tiny models, what a transformers model test checks: the caller's
config is never written (a second model from it is accepted, attention switches and ``output_attentions`` work),
image tokens without images are text, output shapes never change when nothing is merged whatever the padding,
right padding and image tokens under the mask run. A refused ``apply_lightkv`` leaves the model as it was;
``copy.deepcopy`` carries the patch, pickling is refused; ``lightkv_stats`` says what each stage did.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

pytest.importorskip("transformers")

from helpers.hf_cases import BACKEND, batch_of_two, generate, image_for, released  # noqa: E402
from helpers.hf_models import PAD, Image, Sample, build, make_inputs  # noqa: E402
from helpers.tolerances import assert_close_rounding, text_model_chain  # noqa: E402

from lightkv_adapters.hf import apply_lightkv, lightkv, remove_lightkv  # noqa: E402
from lightkv_core import LightKVConfig  # noqa: E402
from lightkv_core.methods import LightKV  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def zero_ratios(kind: str) -> LightKVConfig:
    schedule = released(kind)
    return LightKVConfig(schedule.merge_layers, schedule.merge_windows, (0.0,) * len(schedule.merge_layers))


def forward(model, inputs: dict, **kwargs):
    with torch.no_grad():
        return model(**inputs, **kwargs)


def hooks(model) -> list[int]:
    return [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]


# ----------------------------------------------------------------------------------------------
# 1. The caller's config


def test_the_config_is_never_written_and_a_second_model_from_it_is_accepted() -> None:
    model = build("qwen2.5-vl")
    config = model.config
    implementations = {name: getattr(config, name)._attn_implementation for name in ("text_config", "vision_config")}
    apply_lightkv(model, backend=BACKEND)
    assert {n: getattr(config, n)._attn_implementation for n in implementations} == implementations
    twin = type(model)(config).eval()
    apply_lightkv(twin, backend=BACKEND)  # was refused: the shared config named lightkv's wrapper
    remove_lightkv(twin)
    remove_lightkv(model)


@pytest.mark.parametrize("kind", ["llava", "qwen2-vl"])
def test_switching_attention_and_output_attentions_while_applied(kind: str) -> None:
    model = build(kind)
    inputs = make_inputs(model, kind, batch_of_two(kind))
    model.set_attn_implementation("eager")
    stock = forward(model, inputs, output_attentions=True)
    model.set_attn_implementation("sdpa")
    with lightkv(model, zero_ratios(kind), backend=BACKEND):
        model.set_attn_implementation("eager")  # switched on the model while applied: followed, not refused
        hooked = forward(model, inputs, output_attentions=True)
        model.set_attn_implementation("sdpa")
    assert torch.equal(hooked.logits, stock.logits)
    assert all(torch.equal(a, b) for a, b in zip(hooked.attentions, stock.attentions, strict=True))


def test_an_unwrapped_implementation_set_while_applied_is_named() -> None:
    model = build("llava")
    inputs = make_inputs(model, "llava", batch_of_two("llava"))
    with lightkv(model, backend=BACKEND):
        model.model.language_model.layers[3].self_attn.config.config._attn_implementation = "flex_attention"
        with pytest.raises(NotImplementedError, match="'flex_attention', which lightkv does not wrap"):
            forward(model, inputs)


# ----------------------------------------------------------------------------------------------
# 2. Image tokens without images, padding anywhere, images under the mask


@pytest.mark.parametrize("kind", ["llava", "llava-next", "qwen2.5-vl"])
def test_image_tokens_without_images_are_text(kind: str) -> None:
    model = build(kind)
    inputs = make_inputs(model, kind, batch_of_two(kind))
    text_only = {name: value for name, value in inputs.items() if name in ("input_ids", "attention_mask")}
    stock = forward(model, text_only).logits
    with lightkv(model, released(kind), backend=BACKEND):
        assert torch.equal(forward(model, text_only).logits, stock)
        assert model.lightkv_stats.original_vision_tokens.tolist() == [0, 0]


def pad_left(inputs: dict, columns: int) -> dict:
    """``inputs`` with ``columns`` more padding columns on the left of every sample."""
    padded = dict(inputs)
    for name, fill in (("input_ids", PAD), ("attention_mask", 0), ("mm_token_type_ids", 0)):
        if name in inputs:
            value = inputs[name]
            padded[name] = torch.cat([torch.full((value.shape[0], columns), fill, dtype=value.dtype), value], dim=1)
    return padded


def flip_padding(inputs: dict) -> dict:
    """Left-padded ``inputs`` padded on the right instead (each sample's tokens moved to the row's start)."""
    flipped = dict(inputs)
    lengths = inputs["attention_mask"].sum(dim=1)
    width = inputs["attention_mask"].shape[1]
    for name in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if name in inputs:
            rows = [torch.roll(row, int(length) - width) for row, length in zip(inputs[name], lengths, strict=True)]
            flipped[name] = torch.stack(rows)
    return flipped


@pytest.mark.parametrize("kind", ["llava", "qwen2-vl"])
@pytest.mark.parametrize("padding", ["shared left column", "right"])
def test_zero_ratios_keep_the_output_shape_and_logits_whatever_the_padding(kind: str, padding: str) -> None:
    model = build(kind)
    inputs = make_inputs(model, kind, batch_of_two(kind))
    inputs = pad_left(inputs, 1) if padding == "shared left column" else flip_padding(inputs)
    stock = forward(model, inputs).logits
    with lightkv(model, zero_ratios(kind), backend=BACKEND):
        hooked = forward(model, inputs).logits
    assert hooked.shape == stock.shape
    real = inputs["attention_mask"].bool()
    assert torch.equal(hooked[real], stock[real])


@pytest.mark.parametrize("kind", ["llava", "qwen2.5-vl"])
def test_a_right_padded_batch_equals_its_samples_alone(kind: str) -> None:
    model = build(kind)
    samples = batch_of_two(kind)
    with lightkv(model, released(kind), backend=BACKEND):
        batch = flip_padding(make_inputs(model, kind, samples))
        logits = forward(model, batch).logits
        stats = model.lightkv_stats
        assert (stats.vision_tokens[-1] < stats.original_vision_tokens).all()
        for index, sample in enumerate(samples):
            alone = forward(model, make_inputs(model, kind, [sample])).logits[0]
            length = alone.shape[0]
            chain = text_model_chain(model.model.language_model.config, batch["input_ids"].shape[1])
            assert_close_rounding(alone, logits[index, :length], chain)  # right padding: real tokens first


def test_images_under_the_mask_are_left_alone_and_named() -> None:
    model = build("llava")
    inputs = make_inputs(model, "llava", [Sample((Image(),), before=2), Sample((Image(),), before=2, seed=3)])
    inputs["attention_mask"][0, :5] = 0  # the first image's tokens start under the mask
    stock = forward(model, inputs)
    with lightkv(model, zero_ratios("llava"), backend=BACKEND):
        assert torch.equal(forward(model, inputs).logits[:, -1], stock.logits[:, -1])
    with lightkv(model, released("llava"), backend=BACKEND):
        generate(model, inputs)
        stats = model.lightkv_stats
    assert len(stats.images_left_alone[0]) == 1 and "under the attention mask" in stats.images_left_alone[0][0]
    assert stats.images_left_alone[1] == ()
    assert stats.vision_tokens[-1, 0] == 0 and stats.vision_tokens[-1, 1] < 144


def test_a_mask_with_holes_runs_uncompressed_with_a_warning() -> None:
    model = build("llava")
    inputs = make_inputs(model, "llava", batch_of_two("llava"))
    inputs["attention_mask"][1, 3] = 0
    stock = forward(model, inputs).logits
    with lightkv(model, released("llava"), backend=BACKEND), pytest.warns(UserWarning, match="has holes"):
        assert torch.equal(forward(model, inputs).logits, stock)
        assert all("has holes" in note for notes in model.lightkv_stats.images_left_alone for note in notes)


# ----------------------------------------------------------------------------------------------
# 3. Atomic apply, copies, the applied schedule and what each stage did


def test_a_refused_apply_leaves_the_model_as_it_was() -> None:
    model = build("qwen2.5-vl")
    before = hooks(model)
    text = model.model.language_model
    text.layers[2].self_attn.config = copy.copy(text.config)
    text.layers[2].self_attn.config._attn_implementation = "flex_attention"
    with pytest.raises(NotImplementedError, match="flex_attention"):
        apply_lightkv(model, backend=BACKEND)
    assert hooks(model) == before and "get_image_features" not in vars(model.model)
    assert not hasattr(model, "lightkv_method")
    assert type(text.layers[0].self_attn.config) is type(text.config)
    text.layers[2].self_attn.config = text.config
    apply_lightkv(model, backend=BACKEND)  # was "get_image_features is already patched on this instance"
    refused = r"apply_lightkv: backend must be one of \('auto', 'triton', 'torch'\), got 'cuda'"
    with pytest.raises(ValueError, match=refused):
        apply_lightkv(build("llava"), backend="cuda")


def test_deepcopy_carries_the_patch_and_pickling_is_refused() -> None:
    model = build("llava")
    inputs = make_inputs(model, "llava", batch_of_two("llava"))
    apply_lightkv(model, released("llava"), backend=BACKEND)
    generate(model, inputs)
    stats = model.lightkv_stats
    twin = copy.deepcopy(model)
    assert model.lightkv_stats is stats, "the original keeps its stats"
    assert twin.lightkv_stats is None and twin.lightkv_method == model.lightkv_method
    assert torch.equal(generate(twin, inputs).sequences, generate(model, inputs).sequences)
    assert torch.equal(twin.lightkv_stats.kv_tokens, model.lightkv_stats.kv_tokens)
    assert (twin.lightkv_stats.kv_tokens[-1] < twin.lightkv_stats.kv_tokens[0]).all()
    with pytest.raises(TypeError, match="cannot be pickled: remove_lightkv"):
        pickle.dumps(model)
    remove_lightkv(twin)
    remove_lightkv(model)


def test_the_applied_schedule_and_skipped_stages_are_public() -> None:
    model = build("qwen2.5-vl")
    apply_lightkv(model, backend=BACKEND)
    assert model.lightkv_method == LightKV(released("qwen2.5-vl"), BACKEND)  # 12-17-22 of 28 layers, scaled to 8
    small = make_inputs(model, "qwen2.5-vl", [Sample((Image(12, 12),)), Sample((image_for("qwen2.5-vl"),), seed=2)])
    generate(model, small)
    first, second, third = model.lightkv_stats.stages
    assert [stage.layer for stage in (first, second, third)] == list(released("qwen2.5-vl").merge_layers)
    assert first.ran == (False, False)  # W=6 needs 288 mergeable tokens per image
    assert first.skipped[0] == "images of 36 mergeable tokens: a stage of 6x6 windows needs 288 per image"
    assert first.vision_before == first.vision_after == (36, 144)
    assert second.ran == (False, True) and "needs 128 per image" in second.skipped[0]
    assert third.ran == (True, True) and third.vision_after[1] < third.vision_before[1]
    remove_lightkv(model)
