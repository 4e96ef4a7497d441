"""What differs between the supported model classes: where the text model is, which released schedule
applies, and where each image's tokens sit in ``input_ids`` with which grid (the vision spans).

Every image is described by its pieces (:mod:`lightkv_core.layouts`), which fill consecutive placeholder
tokens, images in prompt order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightkv_core import layouts
from lightkv_core.spans import VisionSpan

#: Text backbones whose decoder layers lightkv has been checked against.
TEXT_BACKBONES = ("llama", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text")


@dataclass(frozen=True)
class Family:
    """One supported model class.

    Attributes:
        name: ``"llava"``, ``"llava-next"``, ``"qwen2-vl"`` or ``"qwen2.5-vl"``.
        preset: the released schedule it uses (a key of :data:`lightkv_core.config.PRESETS`).
        spans: ``(model, inputs) -> one list of VisionSpan per sample`` where ``inputs`` are the multimodal
            model's forward arguments by name (``input_ids`` present).
        grid_arguments: ``(method, argument)`` pairs: the base model's feature methods and the grid argument
            each takes (``image_sizes``, ``image_grid_thw``, ...), which ``spans`` reads from ``inputs`` under
            the same name. ``generate()`` encodes the images before the prefill and passes only the features
            on, so the adapter records these arguments when the features are computed.
    """

    name: str
    preset: str
    spans: Callable[[nn.Module, dict], list[list[VisionSpan]]]
    grid_arguments: tuple[tuple[str, str], ...] = ()


def image_spans(
    input_ids: torch.Tensor, token_id: int, images: Sequence[Sequence[VisionSpan]], what: str
) -> list[list[VisionSpan]]:
    """Place each image's pieces on the ``token_id`` placeholders of ``input_ids`` ``(B, S)``, images in
    prompt order (sample 0 first).

    Raises:
        ValueError if the placeholders do not match the images' token counts or a piece is not contiguous.
    """
    per_sample: list[list[VisionSpan]] = []
    remaining = list(images)
    for b, row in enumerate(input_ids):
        positions = (row == token_id).nonzero().squeeze(1).tolist()
        spans: list[VisionSpan] = []
        cursor = 0
        while cursor < len(positions):
            if not remaining:
                raise ValueError(
                    f"sample {b} has {len(positions) - cursor} more {what} placeholder tokens than the {what} "
                    f"inputs account for ({len(images)} {what}s)"
                )
            for piece in remaining.pop(0):
                end = cursor + piece.length
                run = positions[cursor:end]
                if len(run) < piece.length or run[-1] - run[0] != piece.length - 1:
                    raise ValueError(
                        f"sample {b}: a {what} of {piece.length} tokens needs that many consecutive placeholder "
                        f"tokens at position {positions[cursor]}; the prompt does not match the {what} inputs"
                    )
                spans.extend(layouts.place([piece], run[0]))
                cursor = end
        per_sample.append(spans)
    if remaining:
        raise ValueError(f"{len(remaining)} {what}(s) have no placeholder tokens in input_ids")
    return per_sample


def merge_modalities(*per_modality: list[list[VisionSpan]]) -> list[list[VisionSpan]]:
    """Combine per-sample span lists of several modalities, sorted by position."""
    return [
        sorted((s for spans in sample for s in spans), key=lambda s: s.start)
        for sample in zip(*per_modality, strict=True)
    ]


def _llava_spans(model: nn.Module, inputs: dict) -> list[list[VisionSpan]]:
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    (piece,) = layouts.llava_image(side, leading_cls=config.vision_feature_select_strategy == "full")
    input_ids = inputs["input_ids"]
    placeholders = int((input_ids == config.image_token_id).sum())
    if placeholders % piece.length:
        raise ValueError(
            f"input_ids hold {placeholders} image tokens, not a multiple of the {piece.length} tokens of one image"
        )
    return image_spans(input_ids, config.image_token_id, [[piece]] * (placeholders // piece.length), "image")


def _llava_next_spans(model: nn.Module, inputs: dict) -> list[list[VisionSpan]]:
    from transformers.models.llava_next.modeling_llava_next import (
        get_anyres_image_grid_shape,
        image_size_to_num_patches,
        unpad_image,
    )

    config = model.config
    input_ids = inputs["input_ids"]
    image_sizes = inputs.get("image_sizes")
    if not bool((input_ids == config.image_token_id).any()):
        return [[] for _ in range(input_ids.shape[0])]
    if image_sizes is None:
        raise ValueError("LLaVA-NeXT inputs with image tokens need image_sizes to lay out each image's grid")
    if config.vision_feature_select_strategy != "default":
        raise NotImplementedError("lightkv supports LLaVA-NeXT with vision_feature_select_strategy='default' only")
    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size
    images = []
    for size in image_sizes:
        unpadded = None
        if image_size_to_num_patches(size, config.image_grid_pinpoints, tile) > 1:
            tiles_high, tiles_wide = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, tile)
            unpadded = tuple(unpad_image(torch.empty(0, tiles_high * side, tiles_wide * side), size).shape[1:])
        images.append(layouts.llava_next_image(side, unpadded))
    return image_spans(input_ids, config.image_token_id, images, "image")


def _qwen_vl_spans(model: nn.Module, inputs: dict) -> list[list[VisionSpan]]:
    config = model.config
    merge = config.vision_config.spatial_merge_size
    input_ids = inputs["input_ids"]
    per_modality = []
    for what, token_id, grids in (
        ("image", config.image_token_id, inputs.get("image_grid_thw")),
        ("video", config.video_token_id, inputs.get("video_grid_thw")),
    ):
        if grids is None:
            if bool((input_ids == token_id).any()):
                raise ValueError(f"input_ids hold {what} tokens but no {what}_grid_thw was given")
            per_modality.append([[] for _ in range(input_ids.shape[0])])
            continue
        # each temporal patch (a still image has one) is its own image with its own grid
        items = [layouts.qwen_vl_item(t, h, w, merge) for t, h, w in grids.tolist()]
        per_modality.append(image_spans(input_ids, token_id, items, what))
    return merge_modalities(*per_modality)


_QWEN_GRIDS = (("get_image_features", "image_grid_thw"), ("get_video_features", "video_grid_thw"))


def family_of(model: nn.Module) -> Family:
    """The :class:`Family` of ``model``.

    Raises:
        NotImplementedError naming the supported classes.
    """
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
    )

    families = (
        (
            LlavaNextForConditionalGeneration,
            Family("llava-next", "llava-next", _llava_next_spans, (("get_image_features", "image_sizes"),)),
        ),
        (LlavaForConditionalGeneration, Family("llava", "llava-1.5", _llava_spans)),
        (Qwen2_5_VLForConditionalGeneration, Family("qwen2.5-vl", "qwen2.5-vl", _qwen_vl_spans, _QWEN_GRIDS)),
        (Qwen2VLForConditionalGeneration, Family("qwen2-vl", "qwen2.5-vl", _qwen_vl_spans, _QWEN_GRIDS)),
    )
    for cls, family in families:
        if isinstance(model, cls):
            _check_text_backbone(model)
            return family
    supported = ", ".join(cls.__name__ for cls, _ in families)
    raise NotImplementedError(f"lightkv does not support {type(model).__name__}; supported classes: {supported}")


def _check_text_backbone(model: nn.Module) -> None:
    config = model.model.language_model.config
    if config.model_type not in TEXT_BACKBONES:
        raise NotImplementedError(
            f"lightkv does not support the text backbone {config.model_type!r}; supported: {', '.join(TEXT_BACKBONES)}"
        )
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise NotImplementedError(f"lightkv needs full attention in every layer; this model has {sorted(layer_types)}")
