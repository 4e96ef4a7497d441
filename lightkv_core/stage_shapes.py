"""The shapes a model's LightKV stages hand the kernels, for tuning them: a stage's sequence length, guide tokens,
attention and hidden widths and vision spans (:class:`StageShape`), from a model preset or written by hand."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from lightkv_core.budget import MODEL_SHAPES
from lightkv_core.config import PRESET_DEPTHS, PRESETS, LightKVConfig
from lightkv_core.spans import VisionSpan
from lightkv_core.stage import lightkv_stage


@dataclass(frozen=True)
class StageShape:
    """The inputs of one LightKV stage, by shape.

    Attributes:
        label: e.g. ``"llava-next stage 2 (layer 18, W=2)"``.
        seq: tokens in the sequence when the stage runs (``S``).
        guide_tokens: text tokens that guide the scoring (``T``).
        heads, kv_heads, head_dim: attention shape of ``q`` ``(1, heads, S, head_dim)`` and ``k``.
        hidden: width of the hidden states the grouping and merge kernels read (``D``).
        spans: the images' vision spans at this stage.
        window, ratio: the stage's window count per side and merge ratio.
    """

    label: str
    seq: int
    guide_tokens: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    spans: tuple[VisionSpan, ...]
    window: int
    ratio: float

    def describe(self) -> str:
        """The dimensions, e.g. ``"S=2980 T=100 H=32/32 d=128 D=4096 vision=2880 W=4"``."""
        vision = sum(span.length for span in self.spans)
        attention = f"H={self.heads}/{self.kv_heads} d={self.head_dim}"
        return f"S={self.seq} T={self.guide_tokens} {attention} D={self.hidden} vision={vision} W={self.window}"


def preset_shapes(preset: str, text_tokens: int = 100, seq: int | None = None) -> list[StageShape]:
    """The shapes of every stage of ``preset``'s released schedule on a prompt of its family.

    Args:
        preset: a key of :data:`~lightkv_core.config.PRESETS` (its 7B model shape from
            :data:`~lightkv_core.budget.MODEL_SHAPES`).
        text_tokens: text tokens in the prompt (all of them guide the scoring; 35 go before the images).
        seq: if given, the images are replaced by as many ``rows x cols`` images as fit ``seq - text_tokens``
            vision tokens (at least one), to tune for longer or shorter prompts than the preset's.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if text_tokens < 1:
        raise ValueError(f"text_tokens must be at least 1, got {text_tokens}")
    model = MODEL_SHAPES[preset]
    config: LightKVConfig = PRESETS[preset]
    rows, cols = model.grid
    images = model.images if seq is None else max(1, (seq - text_tokens) // (rows * cols))
    before = min(35, text_tokens)
    spans, position = [], before
    for _ in range(images):
        spans.append(VisionSpan(position, position + rows * cols, rows, cols))
        position += rows * cols
    length = position + text_tokens - before
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, length, 16, generator=generator)
    shapes = []
    for stage, (layer, window, ratio) in enumerate(
        zip(config.merge_layers, config.merge_windows, config.merge_ratios, strict=True), start=1
    ):
        current = hidden.shape[1]
        shapes.append(
            StageShape(
                label=f"{preset} stage {stage} (layer {layer} of {PRESET_DEPTHS[preset]}, W={window})",
                seq=current,
                guide_tokens=text_tokens,
                heads=model.heads,
                kv_heads=model.kv.kv_heads,
                head_dim=model.kv.head_dim,
                hidden=model.hidden_size,
                spans=tuple(spans),
                window=window,
                ratio=ratio,
            )
        )
        q = torch.randn(1, 2, current, 16, generator=generator)
        result = lightkv_stage(hidden, q, q, list(spans), window, ratio, layout=config.layout, backend="torch")
        hidden, spans = result.hidden, list(result.spans)
    return shapes


def parse_shape(text: str, base: StageShape) -> StageShape:
    """``base`` with fields overridden by ``text``, e.g. ``"S=2880,T=128"`` (also ``H``, ``Hk``, ``d``, ``D``,
    ``W``). ``S`` keeps as many of the base's images as fit beside ``T`` text tokens (at least one); the last ``T``
    text tokens guide."""
    fields = {"S": "seq", "T": "guide_tokens", "H": "heads", "Hk": "kv_heads", "d": "head_dim", "D": "hidden"}
    fields["W"] = "window"
    changes: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        if name not in fields or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(
                f"shape {text!r}: expected NAME=positive integer with NAME in {sorted(fields)}, got {item!r}"
            )
        changes[fields[name]] = int(value)
    if not changes:
        raise ValueError(f"shape {text!r} sets nothing")
    shape = replace(base, **changes, label=f"{base.label} [{text}]")
    first = shape.spans[0]
    size = first.rows * first.cols
    if "seq" in changes:
        images = max(1, (shape.seq - shape.guide_tokens) // size)
        spans = tuple(
            VisionSpan(first.start + i * size, first.start + (i + 1) * size, first.rows, first.cols)
            for i in range(images)
        )
        shape = replace(shape, spans=spans)
    # room for the guide tokens around the images (the sequence grows if S cannot hold one image and T)
    shape = replace(shape, seq=max(shape.seq, sum(span.length for span in shape.spans) + shape.guide_tokens))
    if shape.heads % shape.kv_heads:
        raise ValueError(f"shape {text!r}: {shape.heads} query heads are not a multiple of {shape.kv_heads} KV heads")
    return shape


def guide_positions(shape: StageShape) -> torch.Tensor:
    """Sequence positions of the last ``guide_tokens`` text tokens (positions outside the vision spans)."""
    is_text = torch.ones(shape.seq, dtype=torch.bool)
    for span in shape.spans:
        is_text[span.start : span.end] = False
    text = is_text.nonzero().squeeze(1)
    if text.numel() < shape.guide_tokens:
        raise ValueError(f"{shape.label}: {text.numel()} text tokens cannot hold {shape.guide_tokens} guide tokens")
    return text[text.numel() - shape.guide_tokens :]


def small_shape(shape: StageShape) -> StageShape:
    """A stage small enough for the Triton interpreter with the same structure: 5 text tokens, one 16x16 image,
    16 text tokens (277 tokens: more than the smallest ``SPLIT_S``, so the scoring's query chunks are combined);
    4 query heads over 2 KV heads of 32; hidden width 48; the stage's window, at most 2."""
    return replace(
        shape,
        label=f"{shape.label} [small]",
        seq=277,
        guide_tokens=21,
        heads=4,
        kv_heads=2,
        head_dim=32,
        hidden=48,
        spans=(VisionSpan(5, 261, 16, 16),),
        window=min(shape.window, 2),
    )
