"""The transformers adapter on tiny random-weight models of every supported class (``hf_models``)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from helpers.hf_models import KINDS, Image, Sample, build, make_inputs  # noqa: E402
from helpers.tolerances import assert_close_rounding, text_model_chain  # noqa: E402
from transformers import DynamicCache, StaticCache  # noqa: E402

from lightkv_adapters.hf import apply_lightkv, lightkv, remove_lightkv  # noqa: E402
from lightkv_core import LightKVConfig, StageResult  # noqa: E402
from lightkv_core.budget import layer_kv_lengths  # noqa: E402
from lightkv_core.config import PRESET_DEPTHS, PRESETS  # noqa: E402
from lightkv_core.methods import FastV, LightKV, PrefillReduction  # noqa: E402
from lightkv_core.plan import LengthPlan  # noqa: E402
from lightkv_core.windows import band_of, num_merged  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

NEW_TOKENS = 4
BACKEND = "torch"  # the kernels' own tests cover Triton; here it would only slow the interpreter down
QWEN = ("qwen2-vl", "qwen2.5-vl")
PRESET_OF = {"llava": "llava-1.5", "llava-qwen2": "llava-1.5", "llava-next": "llava-next"}


def image_for(kind: str) -> Image:
    """An image whose token grid nests under the released windows (LLaVA 12x12, LLaVA-NeXT 8x8 base + 16x16
    high-res, Qwen 12x12)."""
    return {"llava-next": Image(64, 64)}.get(kind, Image(24, 24) if kind in QWEN else Image())


def batch_of_two(kind: str) -> list[Sample]:
    """Two prompts of different lengths and image counts (the shorter one is left-padded)."""
    second = (image_for(kind), Image(40, 60)) if kind == "llava-next" else (image_for(kind), image_for(kind))
    return [Sample((image_for(kind),), after=5), Sample(second, before=2, after=9)]


def released(kind: str) -> LightKVConfig:
    preset = PRESET_OF.get(kind, "qwen2.5-vl")
    return PRESETS[preset].scaled_to(8, PRESET_DEPTHS[preset])


def generate(model, inputs: dict, **kwargs):
    return model.generate(
        **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs
    )


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
# 3. Cached decode = a no-cache forward of prompt + generated tokens under the same merge


class Wrapping(PrefillReduction):
    """A method that drives another one (``method``): same layers, same positions."""

    def __init__(self, method: PrefillReduction) -> None:
        self.method = method

    @property
    def reduce_layers(self) -> tuple[int, ...]:
        return self.method.reduce_layers

    @property
    def position_mode(self) -> str:
        return self.method.position_mode

    def plan_lengths(self, spans, seq_len: int) -> LengthPlan:
        return self.method.plan_lengths(spans, seq_len)


class Replay(Wrapping):
    """Runs ``method`` on the first forward, then replays the same merges (same pairs, same weights) on a
    longer sequence whose extra tokens are appended at the end: the no-cache reference for decoding."""

    def __init__(self, method: PrefillReduction) -> None:
        super().__init__(method)
        self.recorded: dict[int, tuple[int, StageResult]] = {}

    def reduce(self, layer, hidden, q, k, spans, **kwargs) -> StageResult:
        if layer not in self.recorded:
            result = self.method.reduce(layer, hidden, q, k, spans, **kwargs)
            self.recorded[layer] = (hidden.shape[1], result)
            return result
        length, result = self.recorded[layer]
        extra = hidden.shape[1] - length
        merged = torch.zeros_like(result.hidden, dtype=torch.float64)
        weight = torch.zeros(result.hidden.shape[:2], dtype=torch.float64)
        scores = result.scores.double() if result.scores is not None else torch.ones(hidden.shape[0], length)
        for b in range(hidden.shape[0]):
            for slot, index in enumerate(result.kept_padded[b].tolist()):
                if index < 0:
                    continue
                sources = [index, *(result.merged_into[b] == index).nonzero().squeeze(1).tolist()]
                for source in sources:
                    merged[b, slot] += scores[b, source] * hidden[b, source].double()
                    weight[b, slot] += scores[b, source]
        merged = merged / weight.clamp(min=1e-8)[..., None]
        appended = torch.arange(length, length + extra).expand(hidden.shape[0], -1)
        return StageResult(
            hidden=torch.cat([merged.to(hidden.dtype), hidden[:, length:]], dim=1),
            positions=torch.cat([result.positions, kwargs["position_ids"][:, length:]], dim=1),
            lengths=result.lengths + extra,
            kept_padded=torch.cat([result.kept_padded, appended], dim=1),
            kept=result.kept,
            spans=result.spans,
            merged_into=result.merged_into,
            scores=result.scores,
        )


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decode_matches_no_cache_forward_under_the_same_merge(kind: str) -> None:
    model = build(kind)
    inputs = make_inputs(model, kind, batch_of_two(kind))
    replay = Replay(LightKV(released(kind), backend=BACKEND))
    with lightkv(model, replay):
        cached = generate(model, inputs)
        generated = cached.sequences[:, inputs["input_ids"].shape[1] :]
        for step in range(1, NEW_TOKENS):
            longer = dict(inputs)
            longer["input_ids"] = torch.cat([inputs["input_ids"], generated[:, :step]], dim=1)
            ones = torch.ones(generated.shape[0], step, dtype=inputs["attention_mask"].dtype)
            longer["attention_mask"] = torch.cat([inputs["attention_mask"], ones], dim=1)
            if "mm_token_type_ids" in inputs:
                longer["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], 0 * ones], dim=1)
            with torch.no_grad():
                logits = model(**longer, use_cache=False).logits[:, -1]
            # the cached step and the recompute sum in other orders (other shapes)
            chain = text_model_chain(model.model.language_model.config, longer["input_ids"].shape[1])
            assert_close_rounding(logits, cached.logits[step], chain)


# ----------------------------------------------------------------------------------------------
# 4. Scores handed to the core = scores from full attention logits on the same inputs


class Spy(Wrapping):
    """Records what the adapter hands to the method, then runs it."""

    def __init__(self, method: PrefillReduction) -> None:
        super().__init__(method)
        self.calls: list[dict] = []

    def reduce(self, layer, hidden, q, k, spans, **kwargs) -> StageResult:
        result = self.method.reduce(layer, hidden, q, k, spans, **kwargs)
        self.calls.append(dict(layer=layer, hidden=hidden, q=q, k=k, spans=spans, result=result, **kwargs))
        return result


@pytest.mark.parametrize("kind", ["llava", "qwen2.5-vl"])
def test_scores_equal_full_attention_scores_of_the_layer_inputs(kind: str) -> None:
    model = build(kind)
    inputs = make_inputs(model, kind, batch_of_two(kind))
    config = released(kind)
    spy = Spy(LightKV(config, backend=BACKEND))
    first = config.merge_layers[0] if kind == "llava" else config.merge_layers[1]  # Qwen's first stage skips
    layer = model.model.language_model.layers[first]
    seen = {}

    def grab(module, args, kwargs):
        seen["hidden"], seen["cos_sin"] = args[0], kwargs["position_embeddings"]

    handle = layer.register_forward_pre_hook(grab, with_kwargs=True)
    with lightkv(model, spy), torch.no_grad():
        model(**inputs)
    handle.remove()
    call = next(c for c in spy.calls if c["layer"] == first)
    attention = layer.self_attn
    module = __import__(type(attention).__module__, fromlist=["apply_rotary_pos_emb"])
    if hasattr(module, "apply_rotary_pos_emb"):
        apply_rotary = module.apply_rotary_pos_emb
    else:  # Qwen2-VL's M-RoPE sections applied inside attention (transformers < 5.17)
        sections = attention.config.rope_parameters["mrope_section"]
        apply_rotary = lambda q, k, cos, sin: module.apply_multimodal_rotary_pos_emb(q, k, cos, sin, sections)  # noqa: E731
    with torch.no_grad():
        x = layer.input_layernorm(seen["hidden"])
        batch, seq, _ = x.shape
        d = attention.head_dim
        q = attention.q_proj(x).view(batch, seq, -1, d).transpose(1, 2)
        k = attention.k_proj(x).view(batch, seq, -1, d).transpose(1, 2)
        q, k = apply_rotary(q, k, *seen["cos_sin"])
    torch.testing.assert_close(call["q"], q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(call["k"], k, atol=1e-6, rtol=1e-6)

    q64, k64 = q.double().numpy(), k.double().numpy()
    group = q64.shape[1] // k64.shape[1]
    real = call["attention_mask"].numpy()
    expected = np.zeros((batch, seq))
    for b in range(batch):
        vision = np.zeros(seq, dtype=bool)
        for span in call["spans"][b]:
            vision[span.start : span.end] = True
        guide = np.flatnonzero(real[b] & ~vision)
        queries = np.flatnonzero(real[b])
        for h in range(q64.shape[1]):
            logits = q64[b, h, queries] @ k64[b, h // group, guide].T / np.sqrt(d)  # (queries, guide): no causal mask
            probs = np.exp(logits - logits.max(axis=0)) / np.exp(logits - logits.max(axis=0)).sum(axis=0)
            expected[b, queries] += probs.sum(axis=1)
        np.testing.assert_allclose(call["result"].scores[b, vision].numpy(), expected[b, vision], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------
# 5. Batched = one by one


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
# 6. remove_lightkv restores the model exactly; other methods; errors


def _hooks(model) -> list[int]:
    return [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]


@pytest.mark.parametrize("kind", ["llava-next", "qwen2-vl"])
def test_remove_restores_the_model_exactly(kind: str) -> None:
    model = build(kind)
    inputs = make_inputs(model, kind, batch_of_two(kind))
    before = generate(model, inputs)
    keys, hooks = list(model.state_dict()), _hooks(model)
    implementation = model.config.text_config._attn_implementation
    apply_lightkv(model, backend=BACKEND)
    assert model.config.text_config._attn_implementation == "lightkv_sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    generate(model, inputs)
    assert list(model.state_dict()) == keys
    remove_lightkv(model)
    after = generate(model, inputs)
    assert torch.equal(before.sequences, after.sequences)
    assert all(torch.equal(a, b) for a, b in zip(before.logits, after.logits, strict=True))
    assert _hooks(model) == hooks
    assert list(model.state_dict()) == keys
    assert model.config.text_config._attn_implementation == implementation
    assert "get_image_features" not in vars(model.model)
    assert not hasattr(model, "lightkv_stats")
    with pytest.raises(ValueError, match="not applied"):
        remove_lightkv(model)


def test_context_manager_removes_on_error() -> None:
    model = build("llava")
    hooks = _hooks(model)
    with pytest.raises(KeyError), lightkv(model, backend=BACKEND):
        raise KeyError("inside")
    assert _hooks(model) == hooks


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


def test_an_untested_transformers_release_is_named_in_a_warning(monkeypatch) -> None:
    import warnings

    import transformers

    from lightkv_adapters.hf.versions import TESTED_TRANSFORMERS

    oldest, newest = TESTED_TRANSFORMERS
    model = build("llava")
    monkeypatch.setattr(transformers, "__version__", "99.0.0")
    with pytest.warns(UserWarning, match=rf"tested with transformers {oldest} to {newest}, and this is 99\.0\.0"):
        apply_lightkv(model, backend=BACKEND)
    remove_lightkv(model)
    monkeypatch.setattr(transformers, "__version__", newest)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        apply_lightkv(model, backend=BACKEND)
    remove_lightkv(model)


def test_unsupported_models_and_settings_are_refused() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(NotImplementedError, match="LlavaForConditionalGeneration"):
        apply_lightkv(text_only)
    model = build("llava", attn="sdpa")
    model.config.text_config._attn_implementation = "flex_attention"
    with pytest.raises(NotImplementedError, match="attn_implementation='sdpa' or 'eager'"):
        apply_lightkv(model)
    model = build("llava")
    with pytest.raises(ValueError, match="positions='original'"):
        apply_lightkv(model, LightKVConfig("3", "4", "0.5", positions="compact"))
    with pytest.raises(ValueError, match=r"must lie in \[0, 8\)"):
        apply_lightkv(model, LightKVConfig("8", "4", "0.5"))
    with pytest.raises(ValueError, match="unknown preset"):
        apply_lightkv(model, "llava-9")
    apply_lightkv(model, backend=BACKEND)
    with pytest.raises(RuntimeError, match="already applied"):
        apply_lightkv(model)


def test_unsupported_inputs_raise_clear_errors() -> None:
    model = build("llava")
    inputs = make_inputs(model, "llava", batch_of_two("llava"))
    apply_lightkv(model, backend=BACKEND)
    with pytest.raises(ValueError, match="labels"):
        model(**inputs, labels=inputs["input_ids"])
    right = dict(inputs, attention_mask=inputs["attention_mask"].flip(1), input_ids=inputs["input_ids"].flip(1))
    with pytest.raises(ValueError, match="left padding"):
        model(**right)
    with pytest.raises(TypeError, match="DynamicCache only"):
        cache = StaticCache(config=model.config, max_cache_len=1024)
        model.generate(**inputs, max_new_tokens=2, past_key_values=cache)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(**inputs, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="non-empty cache"):
            model(**inputs, past_key_values=cache, use_cache=True)
        more = inputs["input_ids"][:, -3:]
        mask = torch.ones(2, inputs["attention_mask"].shape[1] + 3, dtype=torch.long)
        with pytest.raises(ValueError, match="one token per step"):
            model(input_ids=more, attention_mask=mask, past_key_values=cache, use_cache=True)
        short = cache.layers[-1]
        short.keys, short.values = short.keys[:, :, :-1], short.values[:, :, :-1]
        with pytest.raises(RuntimeError, match="changed outside lightkv"):
            model(input_ids=more[:, :1], attention_mask=mask[:, :-2], past_key_values=cache, use_cache=True)


def test_mismatched_placeholders_are_reported() -> None:
    model = build("llava")
    inputs = make_inputs(model, "llava", [Sample((Image(),))])
    inputs["input_ids"][0, 5] = 1  # one placeholder of the image lost
    with lightkv(model, backend=BACKEND), pytest.raises(ValueError, match="not a multiple"):
        model(**inputs)


def test_images_without_input_ids_are_refused() -> None:
    model = build("llava")
    inputs = make_inputs(model, "llava", [Sample((Image(),))])
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    with lightkv(model, backend=BACKEND), pytest.raises(ValueError, match="pass input_ids"):
        model(inputs_embeds=embeds, **inputs)


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
