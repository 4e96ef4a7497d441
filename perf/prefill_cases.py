"""The prefill benchmark's models and prompts: the sizes, the two random-weight models (the reference decoder and a
Transformers LLaVA), and a :class:`Case` per (model, prompt) whose ``prefill`` runs one timed prefill, stock or with
LightKV (see the prefill section of ``perf/README.md``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lightkv_core.methods import LightKV
from lightkv_core.prefill import synchronized_clock
from lightkv_core.stats import PrefillStats

PATCH = 14  # CLIP patch size in pixels
IMAGE_TOKEN_ID = 32000
VOCAB_SIZE = 32064
TEXT_BEFORE, TEXT_AFTER = 35, 24  # LLaVA-1.5's system prompt before the images, a question after them


@dataclass(frozen=True)
class TextShape:
    """Shape of a Llama-style text model: width ``D``, depth, query heads ``H``, KV heads ``Hk`` (``head_dim = D /
    H``) and SwiGLU inner width."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class Size:
    """A benchmark size: the text model, the CLIP tower of the Transformers model (width, depth) and the vision
    tokens per image side (24: 336 px / patch 14, LLaVA-1.5's 24x24 = 576 per image)."""

    text: TextShape
    tower_width: int
    tower_layers: int
    image_side: int
    note: str

    @property
    def image_tokens(self) -> int:
        return self.image_side * self.image_side


SIZES: dict[str, Size] = {
    # for the tests: a few seconds in all
    "tiny": Size(TextShape(64, 6, 4, 4, 128), 32, 1, image_side=12, note="tiny test model, 12x12 images"),
    # hf_prefill's text model: LLaVA-1.5's multi-head KV at width 1024 (238M text parameters)
    "small": Size(TextShape(1024, 16, 16, 16, 2816), 256, 2, 24, "LLaVA-1.5's head layout, scaled down"),
    # LLaMA-7B's shape (Vicuna-7B, LLaVA-1.5-7B's text model)
    "7b": Size(TextShape(4096, 32, 32, 32, 11008), 256, 2, 24, "LLaMA-7B shape"),
}


@dataclass
class Prefill:
    """One prefill: wall seconds, tokens and bytes (K and V) each layer's cache holds, and the adapter's stats
    (``None`` for a stock Transformers prefill, which records none)."""

    seconds: float
    kv_lengths: list[int]
    kv_layer_bytes: list[int]
    stats: PrefillStats | None


@dataclass(frozen=True)
class Case:
    """A model ready to prefill one prompt: ``prefill(compressed)`` runs it stock (``False``) or with LightKV;
    ``shape`` is read from the model's own config (for the FLOPs)."""

    model: str
    model_class: str
    shape: TextShape
    parameters: int
    images: int
    vision_tokens: int
    prompt_tokens: int
    timed: str
    prefill: Callable[[bool], Prefill]


def timed(fn: Callable[[], object], on: torch.Tensor) -> float:
    """Wall seconds of ``fn()`` (no-grad), the clock read once the device of ``on`` is done before and after."""
    with torch.no_grad():
        started = synchronized_clock(on)
        fn()
        return synchronized_clock(on) - started


@contextmanager
def building(on: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Parameters created in the block are allocated on ``on`` in ``dtype`` (random 7B weights are drawn on the GPU,
    never as float32 on the host)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with on:
            yield
    finally:
        torch.set_default_dtype(previous)


def kv_layer_bytes(layers: Sequence) -> list[int]:
    """Bytes of each cache layer's keys and values (``keys``/``values``: ``(B, Hk, L, d)``, same size)."""
    return [2 * layer.keys.numel() * layer.keys.element_size() for layer in layers]


def prompt_ids(images: int, side: int) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
    """``(input_ids (1, S) int64, spans)``: 35 random text tokens, ``images`` runs of ``side * side`` image tokens,
    24 text tokens; one ``(start, end, side, side)`` span per image."""
    generator = torch.Generator().manual_seed(0)
    before = torch.randint(1, IMAGE_TOKEN_ID, (TEXT_BEFORE,), generator=generator)
    after = torch.randint(1, IMAGE_TOKEN_ID, (TEXT_AFTER,), generator=generator)
    per_image = side * side
    vision = torch.full((images * per_image,), IMAGE_TOKEN_ID)
    spans = [(TEXT_BEFORE + i * per_image, TEXT_BEFORE + (i + 1) * per_image, side, side) for i in range(images)]
    return torch.cat([before, vision, after])[None], spans


def build_reference(size: Size, on: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The reference ``Decoder`` with the text shape of ``size`` and random weights (seed 0)."""
    from lightkv_adapters.reference.decoder import Decoder, DecoderConfig

    text = size.text
    config = DecoderConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_layers,
        num_heads=text.num_heads,
        num_kv_heads=text.num_kv_heads,
    )
    torch.manual_seed(0)
    with building(on, dtype):
        return Decoder(config).eval()


def reference_case(model: torch.nn.Module, size: Size, images: int, method: LightKV) -> Case:
    """The reference decoder prefilling input embeddings ``(1, S, D)``: token embeddings around ``images`` images of
    random vision embeddings; LightKV as its ``reduction``."""
    from lightkv_adapters.reference.decoder import LayerwiseKVCache

    on, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    ids, spans = prompt_ids(images, size.image_side)
    vision_tokens = images * size.image_tokens
    with torch.no_grad():
        embeds = model.model.embed_tokens(ids.to(on))
    vision = torch.randn(vision_tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    embeds[0, TEXT_BEFORE : TEXT_BEFORE + vision_tokens] = vision.to(on, dtype)

    def prefill(compressed: bool) -> Prefill:
        cache = LayerwiseKVCache.empty(model.config.num_layers)
        reduction = method if compressed else None
        stats: list[PrefillStats] = []
        seconds = timed(
            lambda: stats.append(
                model(embeds, spans=[spans], cache=cache, reduction=reduction, last_logits_only=True)[1]
            ),
            embeds,
        )
        return Prefill(seconds, [layer.length for layer in cache.layers], kv_layer_bytes(cache.layers), stats[0])

    c = model.config
    return Case(
        "reference",
        type(model).__name__,
        TextShape(c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size),
        sum(p.numel() for p in model.parameters()),
        images,
        vision_tokens,
        ids.shape[1],
        "Decoder.forward on input embeddings (no vision tower), last-token logits",
        prefill,
    )


def build_hf(size: Size, on: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A ``LlavaForConditionalGeneration`` with random weights (seed 0): a Llama text model of ``size`` (sdpa)
    behind a CLIP tower of ``size`` with patch 14 (336 px images for a 24x24 grid)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = size.text
    vision_config = CLIPVisionConfig(
        hidden_size=size.tower_width,
        intermediate_size=4 * size.tower_width,
        num_hidden_layers=size.tower_layers,
        num_attention_heads=max(1, size.tower_width // 64),
        image_size=size.image_side * PATCH,
        patch_size=PATCH,
    )
    text_config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads,
        num_key_value_heads=text.num_kv_heads,
        max_position_embeddings=4096,
    )
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-1
    )
    torch.manual_seed(0)
    with building(on, dtype):
        model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def hf_case(model: torch.nn.Module, size: Size, images: int, method: LightKV) -> Case:
    """The Transformers model prefilling ``input_ids`` ``(1, S)`` and ``pixel_values`` ``(images, 3, P, P)``
    (``P = 14 * image_side``: 336 px) into a ``DynamicCache``; LightKV through ``lightkv_adapters.hf.lightkv``."""
    from transformers import DynamicCache

    from lightkv_adapters.hf import lightkv

    on, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    ids, _ = prompt_ids(images, size.image_side)
    pixels = torch.randn(
        images, 3, size.image_side * PATCH, size.image_side * PATCH, generator=torch.Generator().manual_seed(1)
    )
    inputs = {
        "input_ids": ids.to(on),
        "attention_mask": torch.ones_like(ids, device=on),
        "pixel_values": pixels.to(on, dtype),
    }

    # transformers 5.24 renamed the forward's past_key_values to cache (the old name warns until 5.40)
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def prefill(compressed: bool) -> Prefill:
        cache = DynamicCache(config=model.config.text_config)
        run = lambda: model(**inputs, **{cache_name: cache}, use_cache=True, logits_to_keep=1)  # noqa: E731
        stats = None
        if compressed:
            with lightkv(model, method):
                seconds = timed(run, inputs["pixel_values"])
                stats = model.lightkv_stats
        else:
            seconds = timed(run, inputs["pixel_values"])
        return Prefill(seconds, [layer.keys.shape[2] for layer in cache.layers], kv_layer_bytes(cache.layers), stats)

    text, tower = model.config.text_config, model.config.vision_config
    return Case(
        "hf",
        type(model).__name__,
        TextShape(
            text.hidden_size,
            text.num_hidden_layers,
            text.num_attention_heads,
            text.num_key_value_heads,
            text.intermediate_size,
        ),
        sum(p.numel() for p in model.parameters()),
        images,
        images * size.image_tokens,
        ids.shape[1],
        f"model forward from input_ids and pixel_values ({tower.num_hidden_layers}-layer CLIP tower of width "
        f"{tower.hidden_size}, projector, text model), last-token logits",
        prefill,
    )
