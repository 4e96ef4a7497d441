"""What the transformers adapter hands to a method, checked by methods that wrap LightKV: cached decoding
equals a no-cache forward replaying the same merges, and the scores equal full-attention scores of the
layer's inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from helpers.hf_cases import BACKEND, NEW_TOKENS, batch_of_two, generate, released  # noqa: E402
from helpers.hf_models import KINDS, build, make_inputs  # noqa: E402
from helpers.hf_replay import Replay, Wrapping  # noqa: E402
from helpers.tolerances import assert_close_rounding, text_model_chain  # noqa: E402

from lightkv_adapters.hf import lightkv  # noqa: E402
from lightkv_core import StageResult  # noqa: E402
from lightkv_core.methods import LightKV, PrefillReduction  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------------------
# 1. Cached decode = a no-cache forward of prompt + generated tokens under the same merge


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
# 2. Scores handed to the core = scores from full attention logits on the same inputs


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
