"""Applying and removing the transformers adapter: ``remove_lightkv`` restores the model exactly, the context
manager removes on error, an untested transformers release is named in a warning, and unsupported models,
settings and inputs are refused with clear errors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from helpers.hf_cases import BACKEND, batch_of_two, generate  # noqa: E402
from helpers.hf_models import IMAGE, Image, Sample, build, make_inputs  # noqa: E402
from transformers import DynamicCache, StaticCache  # noqa: E402

from lightkv_adapters.hf import apply_lightkv, lightkv, remove_lightkv  # noqa: E402
from lightkv_core import LightKVConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------------------
# 1. remove_lightkv restores the model exactly


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
    assert model.config.text_config._attn_implementation == "sdpa"  # the caller's config is never written
    attention = model.model.language_model.layers[0].self_attn
    assert attention.config._attn_implementation == "lightkv_sdpa"
    generate(model, inputs)
    assert list(model.state_dict()) == keys
    remove_lightkv(model)
    after = generate(model, inputs)
    assert torch.equal(before.sequences, after.sequences)
    assert all(torch.equal(a, b) for a, b in zip(before.logits, after.logits, strict=True))
    assert _hooks(model) == hooks
    assert list(model.state_dict()) == keys
    assert model.config.text_config._attn_implementation == implementation
    assert attention.config is model.config.text_config
    assert "get_image_features" not in vars(model.model)
    assert not hasattr(model, "lightkv_stats") and not hasattr(model, "lightkv_method")
    with pytest.raises(ValueError, match="not applied"):
        remove_lightkv(model)


def test_context_manager_removes_on_error() -> None:
    model = build("llava")
    hooks = _hooks(model)
    with pytest.raises(KeyError), lightkv(model, backend=BACKEND):
        raise KeyError("inside")
    assert _hooks(model) == hooks


# ----------------------------------------------------------------------------------------------
# 2. Versions and errors


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
    inputs["input_ids"][0, 5] = 1  # one placeholder of the image lost: the model's own check speaks first
    with pytest.raises(ValueError, match="Image features and image tokens do not match") as stock:
        model(**inputs)
    with lightkv(model, backend=BACKEND), pytest.raises(ValueError) as hooked:
        model(**inputs)
    assert str(hooked.value) == str(stock.value)


def test_a_prompt_the_model_accepts_but_lightkv_cannot_place_is_reported_after_the_models_checks() -> None:
    model = build("qwen2.5-vl")
    inputs = make_inputs(model, "qwen2.5-vl", [Sample((Image(24, 24),))])
    ids = inputs["input_ids"]
    first = int((ids[0] == IMAGE).nonzero()[0])
    ids[0, first + 5], ids[0, -1] = ids[0, -1].item(), IMAGE  # same count, no longer one run: stock fills in order
    with torch.no_grad():
        model(**inputs)
    with lightkv(model, backend=BACKEND), pytest.raises(ValueError, match="consecutive placeholder tokens"):
        model(**inputs)


def test_images_without_input_ids_are_refused() -> None:
    model = build("llava")
    inputs = make_inputs(model, "llava", [Sample((Image(),))])
    embeds = model.get_input_embeddings()(inputs.pop("input_ids"))
    with lightkv(model, backend=BACKEND), pytest.raises(ValueError, match="pass input_ids"):
        model(inputs_embeds=embeds, **inputs)
