"""Qwen2-VL and Qwen2.5-VL with ``--kv-compress`` (text model: ``sglang.srt.models.qwen2.Qwen2Model``).

Each image (each temporal patch of a video) is one vision span whose grid is its ``(h, w)`` patch grid over
the 2x2 spatial merger, read from the item's ``image_grid_thw`` / ``video_grid_thw`` and placed at the
item's token ``offsets`` (inclusive ``(start, end)`` pairs, one per image or per item).
"""

from __future__ import annotations

from sglang.srt.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as _StockQwen2_5_VL
from sglang.srt.models.qwen2_vl import Qwen2VLForConditionalGeneration as _StockQwen2VL
from sglang.srt.multimodal.modality import Modality

from lightkv_adapters.sglang.models.base import capture_spans, install
from lightkv_core import layouts
from lightkv_core.spans import VisionSpan

#: The released schedule of both classes.
PRESET = "qwen2.5-vl"


def qwen_vl_spans(mm_inputs: object, seq_len: int, merge: int) -> list[VisionSpan]:
    """One request's vision spans (prompt token indices, sorted), from its multimodal items.

    Raises:
        ValueError if an item's offsets do not match its grids, or a span runs past the prompt.
    """
    spans = []
    for item in mm_inputs.mm_items:
        if item.modality == Modality.IMAGE:
            grids = item.image_grid_thw
        elif item.modality == Modality.VIDEO:
            grids = item.video_grid_thw
        else:
            raise NotImplementedError(f"lightkv compresses image and video tokens, not {item.modality.name}")
        pieces = [piece for t, h, w in grids.reshape(-1, 3).tolist() for piece in layouts.qwen_vl_item(t, h, w, merge)]
        offsets = [(int(start), int(end)) for start, end in item.offsets]
        if len(offsets) == len(pieces):
            runs = [[piece] for piece in pieces]
        elif len(offsets) == 1:
            runs = [pieces]
        else:
            raise ValueError(
                f"a {item.modality.name.lower()} item has {len(offsets)} token runs for {len(pieces)} grids; lightkv "
                "needs one run per grid or one per item"
            )
        for (start, end), run in zip(offsets, runs, strict=True):
            if end + 1 - start != layouts.num_tokens(run) or end >= seq_len:
                grids_text = [(piece.rows, piece.cols) for piece in run]
                raise ValueError(
                    f"{item.modality.name.lower()} tokens {start}..{end} do not hold grids {grids_text} inside a "
                    f"prompt of {seq_len} tokens"
                )
            spans.extend(layouts.place(run, start))
    return sorted(spans, key=lambda span: span.start)


class _QwenVL:
    """Mixed into both classes: installs the method on ``self.model`` and records spans per forward."""

    def _install_lightkv(self) -> None:
        merge = self.config.vision_config.spatial_merge_size
        self.lightkv_groups = install(self, "model", self, PRESET, lambda inputs, n: qwen_vl_spans(inputs, n, merge))

    def forward(self, input_ids, positions, forward_batch, *args, **kwargs):
        capture_spans(self.lightkv_groups, forward_batch)
        return super().forward(input_ids, positions, forward_batch, *args, **kwargs)


class Qwen2VLForConditionalGeneration(_QwenVL, _StockQwen2VL):
    """SGLang's Qwen2-VL; compresses vision tokens in prefill when ``--kv-compress`` asks for it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._install_lightkv()


class Qwen2_5_VLForConditionalGeneration(_QwenVL, _StockQwen2_5_VL):  # noqa: N801 (SGLang's architecture name)
    """SGLang's Qwen2.5-VL; compresses vision tokens in prefill when ``--kv-compress`` asks for it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._install_lightkv()


EntryClass = [Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration]
