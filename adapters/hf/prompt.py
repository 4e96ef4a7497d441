"""What the multimodal model's pre-hook learns from a forward's inputs: whether it brings images, where each image's
tokens lie (the vision spans), on which side the prompt is padded, and which images lightkv leaves alone.

The prompt is read on the host once per forward (``input_ids`` and a 2D ``attention_mask`` in one copy). Image
tokens without images are text, as in the stock model. A prompt that does not match its images is not reported
here: the stock model checks that first, with its own message, and the adapter raises its own error only where
the model accepted the input (:attr:`PromptLayout.error`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from lightkv_adapters.hf.families import Family
from lightkv_adapters.hf.images import GridRecorder, brings_images
from lightkv_core.spans import VisionSpan, real_runs


@dataclass
class PromptLayout:
    """A forward's prompt as the adapter sees it.

    Attributes:
        spans: one list of vision spans per sample; ``None`` where images come without ``input_ids``.
        brings_images: whether the forward brings images or videos (pixels or precomputed features).
        padding_side: ``"right"`` if every sample's real tokens start the row, else ``"left"``: the side the
            method pads its shorter outputs on, so that a prompt keeps its layout.
        images_left_alone: per sample, a note for each image not handed to the method, and why.
        error: why the prompt does not match its images; raised once the model has run its own checks.
    """

    spans: list[list[VisionSpan]] | None
    brings_images: bool
    padding_side: str = "left"
    images_left_alone: list[list[str]] = field(default_factory=list)
    error: ValueError | None = None


def read_prompt(model: nn.Module, family: Family, recorder: GridRecorder, inputs: dict, prefill: bool) -> PromptLayout:
    """The :class:`PromptLayout` of a forward of ``model.model`` given ``inputs`` by name (``prefill``: its cache
    is empty or absent)."""
    input_ids = inputs.get("input_ids")
    images = brings_images(inputs)
    if input_ids is None:
        return PromptLayout(None, images)
    batch = input_ids.shape[0]
    if not images or not prefill:
        return PromptLayout([[] for _ in range(batch)], images)
    mask = inputs.get("attention_mask")
    has_mask = isinstance(mask, torch.Tensor) and mask.shape == input_ids.shape
    host = torch.stack([input_ids, mask.to(input_ids.dtype)]) if has_mask else input_ids[None]
    host = host.cpu()  # the one read of the device in this forward's hooks
    grids = recorder.grids(inputs.get("mm_encoder_outputs"))
    arguments = {**inputs, **{name: grid for name, grid in grids.items() if inputs.get(name) is None}}
    try:
        spans = family.spans(model, {**arguments, "input_ids": host[0]})
    except ValueError as error:
        return PromptLayout([[] for _ in range(batch)], True, error=error)
    real = host[1] != 0 if has_mask else torch.ones(host.shape[1:], dtype=torch.bool)
    return _fit_to_mask(spans, real)


def _fit_to_mask(spans: list[list[VisionSpan]], real: torch.Tensor) -> PromptLayout:
    """Keep from the method every image whose tokens are not all real tokens of ``real`` ``(B, S)`` (host), and
    every image of a batch whose mask has holes (the methods take one run of real tokens per sample)."""
    bounds = real_runs(real)
    if None in bounds:
        b = bounds.index(None)
        warnings.warn(
            f"lightkv leaves this prompt uncompressed: the attention mask of sample {b} has holes (the methods "
            "take one run of real tokens per sample)",
            UserWarning,
            stacklevel=2,
        )
        notes = [[f"tokens [{s.start}, {s.end}): the mask of sample {b} has holes" for s in sample] for sample in spans]
        return PromptLayout([[] for _ in spans], True, images_left_alone=notes)
    kept: list[list[VisionSpan]] = [[] for _ in spans]
    notes: list[list[str]] = [[] for _ in spans]
    for b, (sample, (start, end)) in enumerate(zip(spans, bounds, strict=True)):
        for span in sample:
            if start <= span.start and span.end <= end:
                kept[b].append(span)
            else:
                notes[b].append(
                    f"tokens [{span.start}, {span.end}): under the attention mask (real tokens [{start}, {end}))"
                )
    padded = [start > 0 or end < real.shape[1] for start, end in bounds]
    right = any(padded) and all(start == 0 for start, _ in bounds)
    return PromptLayout(kept, True, "right" if right else "left", notes)
