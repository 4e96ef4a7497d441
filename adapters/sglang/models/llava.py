"""LLaVA on Llama and Qwen2 text models (SGLang's ``LlavaLlamaForCausalLM`` / ``LlavaQwenForCausalLM``) with
``--kv-compress``.

SGLang places image ``j`` of a request at ``image_offsets[j]`` with ``image_pad_len[j]`` tokens, laid out as
``LlavaBaseForCausalLM.pad_input_ids`` does: a square ``side x side`` grid (LLaVA-1.5, ``pad``), a pooled
``ceil(side/2)`` grid (more than 16 images, i.e. video frames), or LLaVA-NeXT's anyres layout
(:func:`lightkv_core.layouts.llava_next_image`, a single-tile image included).
"""

from __future__ import annotations

import math

from sglang.srt.models.llava import LlavaLlamaForCausalLM as _StockLlavaLlama
from sglang.srt.models.llava import LlavaQwenForCausalLM as _StockLlavaQwen
from sglang.srt.multimodal.mm_utils import get_anyres_image_grid_shape, unpad_image_shape

from lightkv_adapters.sglang.models.base import capture_spans, install
from lightkv_core import layouts
from lightkv_core.spans import VisionSpan

#: The released schedule of both classes (LLaVA-NeXT shares LLaVA-1.5's).
PRESET = "llava-1.5"


class _Llava:
    """Mixed into both classes: installs the method on ``language_model.model`` and records spans."""

    def _install_lightkv(self) -> None:
        self.lightkv_groups = install(self.language_model, "model", self.language_model, PRESET, self.image_spans)

    def image_spans(self, mm_inputs: object, seq_len: int) -> list[VisionSpan]:
        """One request's vision spans from SGLang's ``image_offsets`` / ``image_pad_len``.

        Raises:
            NotImplementedError for a layout other than the three above (e.g. ``anyres_max``).
        """
        offsets, lengths = mm_inputs.image_offsets or [], mm_inputs.image_pad_len or []
        sizes = [size for item in mm_inputs.mm_items for size in (item.image_sizes or [])]
        side = self.num_patches_per_side
        spans = []
        for index, (start, length) in enumerate(zip(offsets, lengths, strict=True)):
            if start + length > seq_len:
                raise ValueError(f"image {index} ({length} tokens at {start}) runs past the {seq_len}-token prompt")
            unpad = "unpad" in getattr(self, "mm_patch_merge_type", "")
            if len(offsets) > 16 and length == math.ceil(side / 2) ** 2:
                spans.extend(layouts.place([layouts.grid(math.ceil(side / 2), math.ceil(side / 2))], start))
            elif length == side * side:
                spans.extend(layouts.place([layouts.grid(side, side)], start))
            elif unpad and length == side * side + 1:  # a single-tile image: its base grid and one newline
                spans.extend(layouts.place(layouts.llava_next_image(side, None), start))
            elif index < len(sizes) and unpad:
                spans.extend(self.anyres_spans(start, length, sizes[index], side))
            else:
                raise NotImplementedError(
                    f"lightkv does not know the layout of an image of {length} tokens (grid side {side})"
                )
        return spans

    def anyres_spans(self, start: int, length: int, size: object, side: int) -> list[VisionSpan]:
        tiles_wide, tiles_high = get_anyres_image_grid_shape(
            size, self.image_grid_pinpoints, self.vision_tower.config.image_size
        )
        rows, cols = unpad_image_shape(tiles_high * side, tiles_wide * side, size)
        if side * side + rows * (cols + 1) != length:
            raise NotImplementedError(
                f"an anyres image of {length} tokens is not a {side}x{side} base grid plus an unpadded {rows}x{cols} "
                "grid with row newlines (anyres_max pooling is not supported)"
            )
        return layouts.place(layouts.llava_next_image(side, (rows, cols)), start)

    def forward(self, input_ids, positions, forward_batch, *args, **kwargs):
        capture_spans(self.lightkv_groups, forward_batch)
        return super().forward(input_ids, positions, forward_batch, *args, **kwargs)


class LlavaLlamaForCausalLM(_Llava, _StockLlavaLlama):
    """SGLang's LLaVA on Llama; compresses vision tokens in prefill when ``--kv-compress`` asks for it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._install_lightkv()


class LlavaQwenForCausalLM(_Llava, _StockLlavaQwen):
    """SGLang's LLaVA on Qwen2; compresses vision tokens in prefill when ``--kv-compress`` asks for it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._install_lightkv()


EntryClass = [LlavaLlamaForCausalLM, LlavaQwenForCausalLM]
