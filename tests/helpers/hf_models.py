"""Tiny random-weight Hugging Face LVLMs built from configs (no hub), and batches of inputs for them.

Every supported class is built small enough for a CPU test: an 8-layer text model of width 64 and a
one- or two-layer vision tower. Images are random pixels; the tokens of each image are laid out as its
processor would (LLaVA: one run per image; LLaVA-NeXT: base grid then the unpadded high-resolution grid
with a row-newline token per row; Qwen2-VL / Qwen2.5-VL: ``<vision_start>`` image tokens ``<vision_end>``).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

KINDS = ("llava", "llava-qwen2", "llava-next", "qwen2-vl", "qwen2.5-vl")

VOCAB = 160
PAD, IMAGE, VIDEO, VISION_START, VISION_END = 0, 150, 151, 152, 153
TEXT_TOKENS = 140
NUM_LAYERS = 8
LLAVA_IMAGE_SIZE = 48  # 12 x 12 = 144 tokens of patch 4
NEXT_TILE = 32  # 8 x 8 = 64 tokens per tile of patch 4
QWEN_PATCH = 2  # a grid of (h, w) patches gives (h/2) x (w/2) tokens after the 2x2 merger

_TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    pad_token_id=PAD,
)


def build(
    kind: str, attn: str = "sdpa", seed: int = 0, qwen_patch: int = QWEN_PATCH, vocab_size: int = VOCAB
) -> torch.nn.Module:
    """A tiny float32 model of ``kind`` (one of :data:`KINDS`) in eval mode, with attention ``attn``.

    ``qwen_patch`` is the Qwen vision patch side in pixels (SGLang's Qwen2.5-VL needs the released 14);
    ``vocab_size`` at least :data:`VOCAB` (a model with a real tokenizer needs more).
    """
    if vocab_size < VOCAB:
        raise ValueError(f"vocab_size must be at least {VOCAB} (the special tokens' ids), got {vocab_size}")
    torch.manual_seed(seed)
    text_fields = dict(_TEXT, vocab_size=vocab_size)
    if kind in ("llava", "llava-qwen2", "llava-next"):
        vision = CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=NEXT_TILE if kind == "llava-next" else LLAVA_IMAGE_SIZE,
            patch_size=4,
        )
        text = Qwen2Config(**text_fields) if kind == "llava-qwen2" else LlamaConfig(**text_fields)
        common = dict(vision_config=vision, text_config=text, image_token_id=IMAGE, vision_feature_layer=-1)
        if kind == "llava-next":
            pinpoints = [[32, 64], [64, 32], [64, 64]]
            model = LlavaNextForConditionalGeneration(LlavaNextConfig(image_grid_pinpoints=pinpoints, **common))
        else:
            model = LlavaForConditionalGeneration(LlavaConfig(**common))
    elif kind in ("qwen2-vl", "qwen2.5-vl"):
        ids = dict(
            image_token_id=IMAGE,
            video_token_id=VIDEO,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
        )
        text = dict(
            text_fields, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        )
        if kind == "qwen2-vl":
            vision = dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=qwen_patch)
            model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **ids))
        else:
            vision = dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                patch_size=qwen_patch,
                out_hidden_size=64,
                window_size=4 * qwen_patch,  # a 2x2 window of merged tokens
                fullatt_block_indexes=[1],
            )
            model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids))
    else:
        raise ValueError(f"unknown kind {kind!r}; known: {KINDS}")
    model.set_attn_implementation(attn)
    return model.eval()


@dataclass(frozen=True)
class Image:
    """One image of a sample: LLaVA ignores the size; LLaVA-NeXT reads ``(height, width)`` in pixels; Qwen
    reads ``(height, width)`` in patches (even numbers) and ``frames > 1`` makes it a video."""

    height: int = 0
    width: int = 0
    frames: int = 1


@dataclass(frozen=True)
class Sample:
    """A prompt: ``before`` text tokens, the images (``between`` text tokens between two images), then
    ``after`` text tokens. Its tokens and pixels are drawn from ``seed`` alone, so a sample is the same
    prompt in any batch."""

    images: tuple[Image, ...] = ()
    before: int = 3
    between: int = 2
    after: int = 6
    seed: int = 0


def make_inputs(model: torch.nn.Module, kind: str, samples: list[Sample]) -> dict:
    """Left-padded model inputs for ``samples`` (what the model's processor would return)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; known: {KINDS}")
    qwen = kind in ("qwen2-vl", "qwen2.5-vl")
    pixels: dict[str, list[torch.Tensor]] = {}
    rows, types = [], []
    for sample in samples:
        generator = torch.Generator().manual_seed(sample.seed)
        ids, kinds = _text(sample.before, generator), [0] * sample.before
        for index, image in enumerate(sample.images):
            if index:
                ids, kinds = ids + _text(sample.between, generator), kinds + [0] * sample.between
            tokens = _add_pixels(model, kind, image, pixels, generator)
            token, token_kind = (VIDEO, 2) if image.frames > 1 else (IMAGE, 1)
            body, body_kinds = [token] * tokens, [token_kind] * tokens
            if qwen:
                body, body_kinds = [VISION_START, *body, VISION_END], [0, *body_kinds, 0]
            ids, kinds = ids + body, kinds + body_kinds
        rows.append(ids + _text(sample.after, generator))
        types.append(kinds + [0] * sample.after)
    width = max(len(row) for row in rows)
    inputs = {name: torch.cat(values) for name, values in pixels.items()}
    inputs["input_ids"] = torch.tensor([[PAD] * (width - len(row)) + row for row in rows])
    inputs["attention_mask"] = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    if qwen and "mm_token_type_ids" in inspect.signature(model.model.forward).parameters:  # since transformers 5.3
        inputs["mm_token_type_ids"] = torch.tensor([[0] * (width - len(row)) + row for row in types])
    if kind == "llava-next" and "pixel_values" in inputs:
        tiles = max(p.shape[1] for p in pixels["pixel_values"])
        inputs["pixel_values"] = torch.cat(
            [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, tiles - p.shape[1])) for p in pixels["pixel_values"]]
        )
    return inputs


def _text(n: int, generator: torch.Generator) -> list[int]:
    return torch.randint(1, TEXT_TOKENS, (n,), generator=generator).tolist()


def _add_pixels(model, kind: str, image: Image, pixels: dict, generator: torch.Generator) -> int:
    """Draw the pixel inputs of one image into ``pixels``; returns its number of tokens."""
    if kind in ("llava", "llava-qwen2"):
        pixels.setdefault("pixel_values", []).append(
            torch.randn(1, 3, LLAVA_IMAGE_SIZE, LLAVA_IMAGE_SIZE, generator=generator)
        )
        return (LLAVA_IMAGE_SIZE // 4) ** 2
    if kind == "llava-next":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        size = torch.tensor([[image.height, image.width]])
        tiles = image_size_to_num_patches(size[0], model.config.image_grid_pinpoints, NEXT_TILE)
        values = torch.randn(1, tiles, 3, NEXT_TILE, NEXT_TILE, generator=generator)
        pixels.setdefault("pixel_values", []).append(values)
        pixels.setdefault("image_sizes", []).append(size)
        with torch.no_grad():
            return model.model.get_image_features(values, size).pooler_output[0].shape[0]
    merge = model.config.vision_config.spatial_merge_size
    temporal = model.config.vision_config.temporal_patch_size
    name, key = ("video", "pixel_values_videos") if image.frames > 1 else ("image", "pixel_values")
    grid = torch.tensor([[max(1, image.frames // temporal), image.height, image.width]])  # F frames: F/2 patches
    pixels.setdefault(f"{name}_grid_thw", []).append(grid)
    patch = model.config.vision_config.patch_size
    values = 3 * temporal * patch * patch
    pixels.setdefault(key, []).append(torch.randn(int(grid.prod()), values, generator=generator))
    return int(grid.prod()) // merge**2


def save_original_llava(model, directory: Path) -> None:
    """Save the Transformers LLaVA ``model`` as an original LLaVA-1.5 checkpoint (what SGLang's
    ``LlavaLlamaForCausalLM`` loads), with the same vision features: layer ``vision_feature_layer``, CLS
    dropped (``patch``; Transformers' ``default``)."""
    from safetensors.torch import save_file

    config = model.config
    assert config.vision_feature_select_strategy == "default" and config.projector_hidden_act == "gelu"
    tower = directory / "clip-vision"  # SGLang picks the tower class by "clip" in its path
    model.model.vision_tower.save_pretrained(tower)
    text = config.text_config.to_dict()
    llava = {key: value for key, value in text.items() if key not in ("model_type", "architectures", "_name_or_path")}
    llava.update(
        architectures=["LlavaLlamaForCausalLM"],
        model_type="llava",
        dtype="float32",
        text_config=text,
        vision_config=config.vision_config.to_dict(),
        image_token_index=config.image_token_id,
        mm_vision_tower=str(tower),
        mm_hidden_size=config.vision_config.hidden_size,
        mm_projector_type="mlp2x_gelu",
        projector_hidden_act=config.projector_hidden_act,
        mm_vision_select_layer=config.vision_feature_layer,
        mm_vision_select_feature="patch",
        image_aspect_ratio="pad",
        mm_patch_merge_type="flat",
    )
    (directory / "config.json").write_text(json.dumps(llava, indent=2))
    renames = {
        "model.multi_modal_projector.linear_1.": "model.mm_projector.0.",
        "model.multi_modal_projector.linear_2.": "model.mm_projector.2.",
        "model.language_model.": "model.",
    }
    weights = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.vision_tower."):
            continue
        for old, new in renames.items():
            if name.startswith(old):
                name = new + name.removeprefix(old)
        weights[name] = tensor.contiguous()
    save_file(weights, directory / "model.safetensors")
