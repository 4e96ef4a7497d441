"""The transformers adapter on tiny random-weight models of every supported class (``hf_models``): zero ratios
are the stock model, the released schedule gives the planned KV lengths, a batch equals its samples one by one,
and other methods, text-only prompts, beam search and bfloat16 run through it."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("transformers")

from helpers.hf_cases import BACKEND, NEW_TOKENS, QWEN, batch_of_two, generate, image_for, released  # noqa: E402
from helpers.hf_models import KINDS, Image, Sample, build, make_inputs  # noqa: E402
from helpers.tolerances import assert_close_rounding, text_model_chain  # noqa: E402

from lightkv_adapters.hf import lightkv  # noqa: E402
from lightkv_core import LightKVConfig  # noqa: E402
from lightkv_core.budget import layer_kv_lengths  # noqa: E402
from lightkv_core.methods import FastV  # noqa: E402
from lightkv_core.windows import band_of, num_merged  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------------------
# 1. Every ratio 0: bit-identical to the stock model


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 2])
def test_zero_ratios_are_bit_identical(kind: str, attn: str, batch: int) -> None:
    model = build(kind, attn)
    inputs = make_inputs(model, kind, batch_of_two(kind)[-batch:])
    stock = generate(model, inputs)
    zero = LightKVConfig(released(kind).merge_layers, released(kind).merge_windows, (0.0, 0.0, 0.0))
    with lightkv(model, zero, backend=BACKEND):
        compressed = generate(model, inputs)
        stats = model.lightkv_stats
    assert torch.equal(stock.sequences, compressed.sequences)
    for step, (expected, got) in enumerate(zip(stock.logits, compressed.logits, strict=True)):
        assert torch.equal(expected, got), f"step {step} differs"
    assert bool((stats.kv_tokens == stats.kv_tokens[0]).all())


# ----------------------------------------------------------------------------------------------
# 2. The released schedule: per-layer KV lengths as planned


def planned_vision_tokens(grids: list[tuple[int, int, int]], config: LightKVConfig) -> list[int]:
    """Vision tokens left after each stage for images ``(rows, cols, structural tokens)``, counted window by
    window. Exact when every stage's windows are unions of the previous stage's (nested bands)."""
    counts = []
    for rows, cols, structural in grids:
        row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        cells = [(r, r + 1, c, c + 1, 1) for r, c in zip(row.flatten().tolist(), col.flatten().tolist(), strict=True)]
        per_stage = [rows * cols]
        for window, ratio in zip(config.merge_windows, config.merge_ratios, strict=True):
            if sum(cell[4] for cell in cells) >= 8 * window * window:
                windows: dict[tuple[int, int], list] = {}
                for top, bottom, left, right, n in cells:
                    key = (
                        int(band_of(torch.tensor(top), rows, window)),
                        int(band_of(torch.tensor(left), cols, window)),
                    )
                    assert key == (
                        int(band_of(torch.tensor(bottom - 1), rows, window)),
                        int(band_of(torch.tensor(right - 1), cols, window)),
                    ), "windows do not nest"
                    old = windows.get(key, [top, bottom, left, right, 0])
                    windows[key] = [
                        min(old[0], top),
                        max(old[1], bottom),
                        min(old[2], left),
                        max(old[3], right),
                        old[4] + n,
                    ]
                cells = [(t, b, le, ri, n - num_merged(ratio, n)) for t, b, le, ri, n in windows.values()]
            per_stage.append(sum(cell[4] for cell in cells))
        counts.append([n + structural for n in per_stage])
    return [sum(image[stage] for image in counts) for stage in range(len(config.merge_layers) + 1)]


def grids_of(kind: str, sample: Sample) -> list[tuple[int, int, int]]:
    grids = []
    for image in sample.images:
        if kind == "llava-next":
            grids += [(8, 8, 0), (image.height // 4, image.width // 4, image.height // 4)]  # square: no unpadding
        elif kind in QWEN:
            grids.append((image.height // 2, image.width // 2, 0))
        else:
            grids.append((12, 12, 0))
    return grids


@pytest.mark.parametrize("kind", KINDS)
def test_released_schedule_kv_lengths_as_planned(kind: str) -> None:
    model = build(kind)
    sample = Sample((image_for(kind), image_for(kind)), after=7)
    inputs = make_inputs(model, kind, [sample])
    config = released(kind)
    with lightkv(model, config, backend=BACKEND):
        generate(model, inputs)
        stats = model.lightkv_stats
    vision = planned_vision_tokens(grids_of(kind, sample), config)
    text = int(inputs["attention_mask"].sum()) - vision[0]
    per_layer = layer_kv_lengths(config.merge_layers, [text + v for v in vision], 8)
    assert stats.kv_tokens[:, 0].tolist() == per_layer
    assert stats.vision_tokens[:, 0].tolist() == layer_kv_lengths(config.merge_layers, vision, 8)
    assert stats.original_vision_tokens.tolist() == [vision[0]]
    assert stats.kv_bytes_saved().item() == (sum([text + vision[0]] * 8) - sum(per_layer)) * stats.bytes_per_token_layer
    assert stats.bytes_per_token_layer == 2 * 2 * 16 * 4  # K and V, 2 KV heads of 16, float32
    assert stats.reduce_seconds > 0


def test_default_config_is_the_family_preset_scaled_to_depth() -> None:
    model = build("llava")
    inputs = make_inputs(model, "llava", [Sample((Image(),))])
    with lightkv(model):  # backend "auto": Triton under the interpreter
        generate(model, inputs)
        default = model.lightkv_stats.kv_tokens
    with lightkv(model, released("llava"), backend=BACKEND):
        generate(model, inputs)
        assert torch.equal(model.lightkv_stats.kv_tokens, default)


# ----------------------------------------------------------------------------------------------
# 3. Batched = one by one


@pytest.mark.parametrize("kind", KINDS)
def test_batched_run_equals_samples_one_by_one(kind: str) -> None:
    model = build(kind)
    samples = [replace(sample, seed=index) for index, sample in enumerate(batch_of_two(kind))]
    samples.append(Sample((), before=4, after=3, seed=7))
    if kind in QWEN:
        samples.append(Sample((Image(8, 8, frames=4), Image(24, 16)), after=4, seed=8))
    with lightkv(model, released(kind), backend=BACKEND):
        batched = generate(model, make_inputs(model, kind, samples))
        batch_stats = model.lightkv_stats
        assert len(set(batch_stats.kv_tokens[-1].tolist())) == len(samples), "survivor counts should differ"
        for index, sample in enumerate(samples):
            alone = generate(model, make_inputs(model, kind, [sample]))
            # a padded batch and a batch of one sum in other orders (other shapes)
            chain = text_model_chain(model.model.language_model.config, batched.sequences.shape[1])
            for step in range(NEW_TOKENS):
                assert_close_rounding(alone.logits[step][0], batched.logits[step][index], chain)
            assert model.lightkv_stats.kv_tokens[:, 0].tolist() == batch_stats.kv_tokens[:, index].tolist()
            assert model.lightkv_stats.vision_tokens[:, 0].tolist() == batch_stats.vision_tokens[:, index].tolist()


# ----------------------------------------------------------------------------------------------
# 4. Other methods, samples without images, beam search and bfloat16


def test_fastv_runs_through_the_adapter() -> None:
    model = build("llava")
    inputs = make_inputs(model, "llava", batch_of_two("llava"))
    with lightkv(model, FastV(layer=2, ratio=0.75)):
        generate(model, inputs)
        stats = model.lightkv_stats
    assert stats.vision_tokens[:3].tolist() == [[144, 288]] * 3
    assert stats.vision_tokens[3:].tolist() == [[36, 72]] * 5


def test_a_sample_without_images_is_untouched() -> None:
    model = build("llava")
    inputs = make_inputs(model, "llava", [Sample((), before=5, after=4)])
    stock = generate(model, inputs)
    with lightkv(model, released("llava"), backend=BACKEND):
        compressed = generate(model, inputs)
        assert model.lightkv_stats.kv_tokens[:, 0].tolist() == [9] * 8
    assert all(torch.equal(a, b) for a, b in zip(stock.logits, compressed.logits, strict=True))


def test_beam_search_and_bfloat16() -> None:
    model = build("llava")
    inputs = make_inputs(model, "llava", batch_of_two("llava"))
    zero = LightKVConfig("3-4-6", "4-2-1", "0-0-0")
    stock = model.generate(**inputs, max_new_tokens=3, num_beams=3, do_sample=False)
    with lightkv(model, zero, backend=BACKEND):
        assert torch.equal(model.generate(**inputs, max_new_tokens=3, num_beams=3, do_sample=False), stock)
    for attn in ("sdpa", "eager"):  # the eager mask is additive: dead slots take bfloat16's minimum
        model = build("qwen2.5-vl", attn).to(torch.bfloat16)
        inputs = make_inputs(model, "qwen2.5-vl", batch_of_two("qwen2.5-vl"))
        inputs = {name: v.to(torch.bfloat16) if v.is_floating_point() else v for name, v in inputs.items()}
        with lightkv(model, released("qwen2.5-vl"), backend=BACKEND):
            out = generate(model, inputs)
            assert model.lightkv_stats.kv_tokens[-1].tolist() == [50, 97]
            assert model.lightkv_stats.bytes_per_token_layer == 2 * 2 * 16 * 2
        assert all(bool(step.isfinite().all()) for step in out.logits)
