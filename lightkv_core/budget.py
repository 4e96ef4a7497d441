"""KV-cache accounting for a schedule: per-layer KV lengths, vision retention, bytes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

EFFECTS = ("after", "at")


def layer_kv_lengths(
    merge_layers: Sequence[int], stage_lengths: Sequence[int], num_layers: int, effect: str = "after"
) -> list[int]:
    """Tokens each layer holds in its KV cache.

    Args:
        merge_layers: the scheduled layers, ascending.
        stage_lengths: ``len(merge_layers) + 1`` token counts: before any stage, then after each.
        num_layers: decoder depth.
        effect: ``"after"`` (as implemented: layer ``l`` keeps its full KV, layers ``> l`` hold the
            survivors) or ``"at"`` (the convention of papers that count layer ``l`` as compressed).

    Returns:
        ``num_layers`` token counts.
    """
    if effect not in EFFECTS:
        raise ValueError(f"effect must be one of {EFFECTS}, got {effect!r}")
    if len(stage_lengths) != len(merge_layers) + 1:
        raise ValueError("stage_lengths needs one entry before the stages and one after each stage")
    shift = 1 if effect == "at" else 0
    return [stage_lengths[sum(layer + 1 - shift <= i for layer in merge_layers)] for i in range(num_layers)]


@dataclass(frozen=True)
class KVFootprint:
    """Bytes of KV cache per token per layer for a model: ``2 (K and V) * kv_heads * head_dim * bytes``."""

    kv_heads: int
    head_dim: int
    bytes_per_value: int

    @property
    def bytes_per_token_layer(self) -> int:
        return 2 * self.kv_heads * self.head_dim * self.bytes_per_value

    def total_bytes(self, per_layer_tokens: Sequence[int]) -> int:
        """KV bytes for the given tokens held in each layer."""
        return self.bytes_per_token_layer * sum(per_layer_tokens)


@dataclass(frozen=True)
class ModelShape:
    """The 7B-class member of a model family, as the accounting and the kernel shapes need it (its depth is
    ``config.PRESET_DEPTHS``).

    Attributes:
        kv: the KV footprint per token per layer.
        heads: query heads (``heads % kv.kv_heads == 0``).
        hidden_size: width of the hidden states.
        grid: ``(rows, cols)`` vision tokens of one image.
        images: images in a typical prompt (LLaVA-NeXT's any-resolution crops count as images).
    """

    kv: KVFootprint
    heads: int
    hidden_size: int
    grid: tuple[int, int]
    images: int


MODEL_SHAPES = {
    "llava-1.5": ModelShape(KVFootprint(32, 128, 2), 32, 4096, (24, 24), 1),
    "llava-next": ModelShape(KVFootprint(32, 128, 2), 32, 4096, (24, 24), 5),
    "qwen2.5-vl": ModelShape(KVFootprint(4, 128, 2), 28, 3584, (36, 36), 1),
}


def vision_retention(per_layer_vision: Sequence[int], original_vision: int) -> float:
    """Vision tokens held in the KV, summed over layers, over ``original_vision x layers``."""
    if original_vision <= 0 or not per_layer_vision:
        raise ValueError("vision_retention needs at least one layer and one original vision token")
    return sum(per_layer_vision) / (original_vision * len(per_layer_vision))


def human_bytes(n: float) -> str:
    """``n`` bytes as ``"512 B"``, ``"1.5 KiB"``, ``"320.5 MiB"`` or ``"2.0 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def apportion(weights: Sequence[float], total: int, caps: Sequence[int]) -> list[int]:
    """Split ``total`` tokens over layers in proportion to ``weights``, no layer above its cap.

    Largest-remainder rounding: each layer first gets ``floor`` of its share, the leftover tokens go to the
    largest fractional parts (ties: lower layer). A layer whose share exceeds its cap is held at the cap and
    the rest is split again over the others. All weights zero means equal weights.

    Args:
        weights: one non-negative weight per layer.
        total: tokens to hand out, ``0 <= total <= sum(caps)``.
        caps: most tokens each layer can hold.

    Returns:
        One count per layer; the counts sum to ``total`` exactly.
    """
    if len(weights) != len(caps):
        raise ValueError(f"apportion: {len(weights)} weights for {len(caps)} caps")
    if any(w < 0 or w != w for w in weights):
        raise ValueError(f"apportion: weights must be non-negative numbers, got {list(weights)}")
    if any(c < 0 for c in caps) or not 0 <= total <= sum(caps):
        raise ValueError(f"apportion: total {total} must lie in [0, sum(caps) = {sum(caps)}] with caps >= 0")
    sizes = [0] * len(caps)
    open_layers = [i for i, cap in enumerate(caps) if cap > 0]
    left = total
    while left > 0:
        mass = sum(weights[i] for i in open_layers)
        share = {i: (weights[i] / mass if mass > 0 else 1.0 / len(open_layers)) * left for i in open_layers}
        full = [i for i in open_layers if share[i] >= caps[i] - sizes[i]]
        if full:
            for i in full:
                left -= caps[i] - sizes[i]
                sizes[i] = caps[i]
            open_layers = [i for i in open_layers if i not in full]
            continue
        floors = {i: int(share[i]) for i in open_layers}
        for i in open_layers:
            sizes[i] += floors[i]
        rest = left - sum(floors.values())
        order = sorted(open_layers, key=lambda i: (-(share[i] - floors[i]), i))
        for i in order[:rest]:
            sizes[i] += 1
        left = 0
    return sizes
