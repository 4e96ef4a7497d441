"""Every method of ``lightkv_core.METHODS`` through the transformers adapter, by name and as an instance; the
post-prefill evictions checked against the reference decoder running the same weights."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from helpers.hf_models import IMAGE, KINDS, Image, Sample, build, make_inputs  # noqa: E402
from helpers.tolerances import assert_close_rounding, text_model_chain  # noqa: E402

from lightkv_adapters.hf import apply_lightkv, lightkv, remove_lightkv  # noqa: E402
from lightkv_adapters.reference.decoder import Decoder, DecoderConfig, LayerwiseKVCache  # noqa: E402
from lightkv_core import VisionSpan  # noqa: E402
from lightkv_core.methods import METHODS, AirCache, KVEviction, LookM, PrefixKV  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

NEW_TOKENS = 4
BACKEND = "torch"


def samples(kind: str) -> list[Sample]:
    image = {"llava-next": Image(64, 64)}.get(kind, Image(24, 24) if kind.startswith("qwen") else Image())
    return [Sample((image,), after=5), Sample((image, image), before=2, after=9)]


def generate(model, inputs: dict):
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )


@pytest.mark.parametrize("kind", ["llava", "qwen2.5-vl", "llava-next"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_by_name(kind: str, name: str) -> None:
    model = build(kind)
    inputs = make_inputs(model, kind, samples(kind))
    with lightkv(model, name, backend=BACKEND):
        out = generate(model, inputs)
        stats = model.lightkv_stats
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + NEW_TOKENS
    retention = stats.vision_retention()
    assert bool((retention < 1).all()) and bool((retention > 0).all())
    assert bool((stats.kv_tokens <= stats.original_tokens).all())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", [PrefixKV, AirCache, LookM])
def test_full_retention_is_the_stock_model(kind: str, method: type) -> None:
    model = build(kind)
    inputs = make_inputs(model, kind, samples(kind))
    stock = generate(model, inputs)
    with lightkv(model, method(retention=1.0, backend=BACKEND)):
        kept = generate(model, inputs)
    assert torch.equal(stock.sequences, kept.sequences)
    # the hooked forward gathers and re-lays its inputs: the same sums, possibly in other orders
    chain = text_model_chain(model.model.language_model.config, stock.sequences.shape[1])
    for a, b in zip(stock.logits, kept.logits, strict=True):
        assert_close_rounding(b, a, chain)


@pytest.mark.parametrize("kind", ["llava", "qwen2.5-vl"])
@pytest.mark.parametrize("method", [PrefixKV, AirCache, LookM])
def test_eviction_meets_its_budget_in_every_sample(kind: str, method: type) -> None:
    model = build(kind)
    inputs = make_inputs(model, kind, samples(kind))
    with lightkv(model, method(retention=0.3, backend=BACKEND)):
        generate(model, inputs)
        stats = model.lightkv_stats
    layers = stats.num_layers
    for b, vision in enumerate(stats.original_vision_tokens.tolist()):
        held = int(stats.vision_tokens[:, b].sum())
        assert held - round(0.3 * vision * layers) in range(0, 4 * layers + 1)  # + PrefixKV's sink tokens
        assert bool((stats.kv_tokens[:, b] - stats.vision_tokens[:, b] == stats.original_tokens[b] - vision).all())


# ----------------------------------------------------------------------------------------------
# The same eviction in the reference decoder and in transformers


def reference_twin(model) -> Decoder:
    """The reference decoder with the LLaVA model's Llama weights."""
    text = model.config.text_config
    decoder = Decoder(
        DecoderConfig(
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_layers=text.num_hidden_layers,
            num_heads=text.num_attention_heads,
            num_kv_heads=text.num_key_value_heads,
            rope_theta=text.rope_parameters["rope_theta"],
            rms_norm_eps=text.rms_norm_eps,
        )
    )
    state = {f"model.{k}": v for k, v in model.model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    decoder.load_state_dict(state)
    return decoder.eval()


def text_model_inputs(model, inputs: dict) -> torch.Tensor:
    """The embeddings (image features in place) the LLaVA model hands its text model."""
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"])

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen["embeds"]


def image_spans(input_ids: torch.Tensor, side: int) -> list[list[VisionSpan]]:
    spans = []
    for row in input_ids.tolist():
        at = [i for i, t in enumerate(row) if t == IMAGE]
        starts = [i for i in at if i - 1 not in at]
        spans.append([VisionSpan(s, s + side * side, side, side) for s in starts])
    return spans


@pytest.mark.parametrize("method", [PrefixKV(0.3), AirCache(0.3), LookM(0.3), LookM(0.3, merge="weighted")])
def test_eviction_matches_the_reference_decoder(method: KVEviction) -> None:
    method = type(method)(**{**vars(method), "backend": BACKEND})
    model = build("llava")
    inputs = make_inputs(model, "llava", samples("llava"))
    decoder = reference_twin(model)
    embeds = text_model_inputs(model, inputs)
    apply_lightkv(model, method)
    out = generate(model, inputs)
    stats = model.lightkv_stats
    remove_lightkv(model)

    cache = LayerwiseKVCache.empty(decoder.config.num_layers)
    spans = image_spans(inputs["input_ids"], 12)
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        logits, reference = decoder(embeds, attention_mask=mask, spans=spans, cache=cache, reduction=method)
        # two implementations of one float32 forward: they differ by rounding only
        chain = text_model_chain(model.model.language_model.config, out.sequences.shape[1])
        assert_close_rounding(logits[:, -1], out.logits[0], chain)
        generated = out.sequences[:, inputs["input_ids"].shape[1] :]
        for step in range(1, NEW_TOKENS):
            token = decoder.model.embed_tokens(generated[:, step - 1 : step])
            logits, _ = decoder(token, cache=cache)
            assert_close_rounding(logits[:, -1], out.logits[step], chain)
    assert torch.equal(reference.kv_tokens, stats.kv_tokens)
    assert torch.equal(reference.vision_tokens, stats.vision_tokens)


def test_eviction_without_images_or_cache_changes_nothing() -> None:
    model = build("llava")
    inputs = make_inputs(model, "llava", [Sample((), before=5, after=4)])
    stock = generate(model, inputs)
    with lightkv(model, "prefixkv", backend=BACKEND):
        plain = generate(model, inputs)
        assert model.lightkv_stats.kv_tokens[:, 0].tolist() == [9] * 8
    assert all(torch.equal(a, b) for a, b in zip(stock.logits, plain.logits, strict=True))
    inputs = make_inputs(model, "llava", samples("llava"))
    with torch.no_grad():
        stock_logits = model(**inputs, use_cache=False).logits
        with lightkv(model, LookM(0.2, backend=BACKEND)):
            assert torch.equal(model(**inputs, use_cache=False).logits, stock_logits)


def test_a_compacted_cache_changed_outside_lightkv_is_refused() -> None:
    from transformers import DynamicCache

    model = build("llava")
    inputs = make_inputs(model, "llava", samples("llava"))
    with lightkv(model, PrefixKV(0.3, backend=BACKEND)), torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(**inputs, past_key_values=cache)
        layer = cache.layers[3]
        layer.keys, layer.values = layer.keys[:, :, 1:], layer.values[:, :, 1:]
        step = {"input_ids": inputs["input_ids"][:, -1:], "past_key_values": cache}
        step["attention_mask"] = torch.cat([inputs["attention_mask"], inputs["attention_mask"][:, -1:]], dim=1)
        with pytest.raises(RuntimeError, match="layer 3 of the compressed KV cache"):
            model(**step)


def test_unknown_names_are_refused() -> None:
    model = build("llava")
    with pytest.raises(ValueError, match="unknown preset or method 'h2o'"):
        apply_lightkv(model, "h2o")
