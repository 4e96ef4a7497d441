"""LightKV schedules: which layers merge, with which windows and ratios, plus the released presets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

GUIDES = ("all_text", "prompt", "none")
LAYOUTS = ("default", "reference")
POSITION_MODES = ("original", "compact")


def parse_values(value: str | int | float | Sequence[int | float], kind: type, name: str) -> tuple:
    """``value`` as a tuple of ``kind``: a string of ``-`` or ``,`` separated items, one number, or a sequence.

    Raises:
        ValueError naming ``name`` if a string item does not parse.
    """
    if isinstance(value, str):
        parts = [p for p in value.replace(",", "-").split("-") if p.strip()]
        try:
            return tuple(kind(p) for p in parts)
        except ValueError:
            raise ValueError(f"{name}: cannot parse {value!r} as '-'-separated {kind.__name__} values") from None
    if isinstance(value, (int, float)):
        return (kind(value),)
    return tuple(kind(v) for v in value)


@dataclass(frozen=True)
class LightKVConfig:
    """A LightKV schedule.

    Attributes:
        merge_layers: decoder layers (0-based) whose *output* is merged, ascending, e.g. ``(12, 18, 24)``.
        merge_windows: windows per image side W at each stage, e.g. ``(4, 2, 1)``.
        merge_ratios: fraction rho in [0, 1] of each window's tokens removed at each stage (capped at
            half the window), e.g. ``(0.5, 0.5, 0.5)``.
        guide: which non-vision tokens steer the merge weights: ``"all_text"`` (released),
            ``"prompt"`` (only those after the last image) or ``"none"`` (uniform weights).
        layout: ``"default"`` (windows on the true grid) or ``"reference"`` (the released code's
            re-squared windows).
        positions: ``"original"`` (survivors keep their position ids) or ``"compact"`` (renumbered);
            ``None`` picks ``"original"`` for the default layout and ``"compact"`` for the reference one.

    Each schedule field also accepts a string such as ``"12-18-24"``.
    """

    merge_layers: tuple[int, ...]
    merge_windows: tuple[int, ...]
    merge_ratios: tuple[float, ...]
    guide: str = "all_text"
    layout: str = "default"
    positions: str | None = None

    def __post_init__(self) -> None:
        layers = parse_values(self.merge_layers, int, "merge_layers")
        windows = parse_values(self.merge_windows, int, "merge_windows")
        ratios = parse_values(self.merge_ratios, float, "merge_ratios")
        object.__setattr__(self, "merge_layers", layers)
        object.__setattr__(self, "merge_windows", windows)
        object.__setattr__(self, "merge_ratios", ratios)
        if not (len(layers) == len(windows) == len(ratios)):
            raise ValueError(
                f"merge_layers, merge_windows and merge_ratios need one entry per stage, got "
                f"{len(layers)}, {len(windows)} and {len(ratios)}"
            )
        if any(layer < 0 for layer in layers) or list(layers) != sorted(set(layers)):
            raise ValueError(f"merge_layers must be distinct, non-negative and ascending, got {layers}")
        if any(w < 1 for w in windows):
            raise ValueError(f"merge_windows must be >= 1, got {windows}")
        if any(not 0.0 <= r <= 1.0 for r in ratios):
            raise ValueError(f"merge_ratios must lie in [0, 1], got {ratios}")
        if self.guide not in GUIDES:
            raise ValueError(f"guide must be one of {GUIDES}, got {self.guide!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.positions is not None and self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES} or None, got {self.positions!r}")

    @property
    def position_mode(self) -> str:
        """The positions mode in force (resolves ``None`` by layout)."""
        return resolve_position_mode(self.positions, self.layout)

    def stage_at(self, layer: int) -> tuple[int, float] | None:
        """``(window, ratio)`` of the stage on the output of ``layer``, or ``None`` if it does not merge."""
        if layer in self.merge_layers:
            index = self.merge_layers.index(layer)
            return self.merge_windows[index], self.merge_ratios[index]
        return None

    def scaled_to(self, num_layers: int, reference_layers: int) -> LightKVConfig:
        """The same schedule moved to a model of ``num_layers`` decoder layers, each merge layer at the
        same relative depth as in a ``reference_layers``-layer model (rounded, kept distinct)."""
        if num_layers < 1 or reference_layers < 1:
            raise ValueError("num_layers and reference_layers must be >= 1")
        layers: list[int] = []
        for layer in self.merge_layers:
            scaled = min(num_layers - 1, max(0, round(layer * num_layers / reference_layers)))
            if layers and scaled <= layers[-1]:
                scaled = layers[-1] + 1
            if scaled >= num_layers:
                raise ValueError(f"cannot fit {len(self.merge_layers)} merge layers into {num_layers} layers")
            layers.append(scaled)
        return replace(self, merge_layers=tuple(layers))

    @classmethod
    def preset(cls, name: str, **overrides: object) -> LightKVConfig:
        """The released schedule of a model family: one of :data:`PRESETS`."""
        key = name.lower().replace("_", "-")
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return replace(PRESETS[key], **overrides)


def resolve_position_mode(positions: str | None, layout: str) -> str:
    """``"original"`` or ``"compact"``: ``positions`` if given, else the layout's default."""
    if positions is None:
        return "compact" if layout == "reference" else "original"
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
    return positions


_LLAVA = LightKVConfig("12-18-24", "4-2-1", "0.5-0.5-0.5")
_QWEN25_VL = LightKVConfig("12-17-22", "6-4-2", "0.5-0.5-0.5")

#: Released schedules (LLaVA-1.5 / LLaVA-NeXT: 32 layers; Qwen2.5-VL-7B: 28 layers).
PRESETS: dict[str, LightKVConfig] = {
    "llava-1.5": _LLAVA,
    "llava-next": _LLAVA,
    "qwen2.5-vl": _QWEN25_VL,
}

#: Decoder depth each preset was tuned for (use with :meth:`LightKVConfig.scaled_to`).
PRESET_DEPTHS: dict[str, int] = {"llava-1.5": 32, "llava-next": 32, "qwen2.5-vl": 28}
