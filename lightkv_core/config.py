"""LightKV schedules: which layers merge, with which windows and ratios, plus the released presets."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, replace

GUIDES = ("all_text", "prompt", "none")
LAYOUTS = ("default", "reference")
POSITION_MODES = ("original", "compact")

_INTEGER = re.compile(r"[0-9]+")
_NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_DASH = re.compile(r"(?<![eE])-")  # a '-' right after an exponent's 'e' belongs to the number


def parse_values(value: object, kind: type, name: str) -> tuple:
    """``value`` as a tuple of finite, non-negative ``kind`` (``int`` or ``float``) numbers: the one parser of
    schedules (``LightKVConfig``, ``lightkv simulate``, the SGLang ``--kv-compress-*`` flags).

    ``value`` is a string, one number or an iterable of numbers. Numbers are ``int``, ``float`` or NumPy scalars;
    ``bool`` is refused, and an ``int`` field refuses every float, integral ones such as ``12.0`` included.
    A string is split on ``,`` if it holds one (``"12,18,24"``), else on ``-`` (``"12-18-24"``, the released
    form; a ``-`` right after an exponent's ``e``, as in ``"1e-3"``, is part of the number). A string that starts
    or ends with ``-`` or holds ``--`` is refused: that is a negative number or an empty item, never a separator.
    Items are unsigned ASCII decimals (no point or exponent for ``int``); blanks around them are ignored.

    Raises:
        ValueError starting with ``name`` and quoting ``value``: no item in a string, an empty, negative,
        non-finite, fractional (``int``), boolean or non-numeric item.
    """
    if kind not in (int, float):
        raise TypeError(f"parse_values converts to int or float, got kind={kind!r}")
    if isinstance(value, str):
        if not value.replace(",", "").replace("-", "").strip():
            raise ValueError(f"{name} needs at least one value, got {value!r}")
        try:
            return tuple(_parse_item(item, kind) for item in _split(value))
        except ValueError as error:
            raise ValueError(
                f"{name} takes a comma-separated list of {kind.__name__}s (or a '-'-separated one), got {value!r}: "
                f"{error}"
            ) from None
    try:
        return tuple(_number(item, kind) for item in _items(value))
    except ValueError as error:
        raise ValueError(f"{name} takes {kind.__name__}s, got {value!r}: {error}") from None


def _split(text: str) -> list[str]:
    """The items of a schedule string (:func:`parse_values` states the rule)."""
    if "," in text:
        return text.split(",")
    body = text.strip()
    if body.startswith("-"):
        raise ValueError("it starts with '-', a negative number or an empty first item ('-' only separates values)")
    if body.endswith("-"):
        raise ValueError("it ends with '-', an empty last item")
    if "--" in body:
        raise ValueError("it holds '--', an empty item or a negative number")
    return _DASH.split(body)


def _parse_item(text: str, kind: type) -> int | float:
    """One item of a schedule string as ``kind``."""
    item = text.strip()
    if not item:
        raise ValueError("it holds an empty item")
    if item.startswith("-"):
        raise ValueError(f"{item!r} is negative")
    if not (_INTEGER if kind is int else _NUMBER).fullmatch(item):
        raise ValueError(f"{item!r} is not a non-negative {'integer' if kind is int else 'decimal number'}")
    number = kind(item)
    if kind is float and not math.isfinite(number):
        raise ValueError(f"{item!r} is too large to be finite")
    return number


def _items(value: object) -> tuple:
    """``value``'s items, or ``(value,)`` for a scalar (and anything that is not an ordered collection)."""
    if isinstance(value, (bytes, Mapping, Set)) or not isinstance(value, Iterable):
        return (value,)
    try:
        return tuple(value)
    except TypeError:  # a 0-d array
        return (value,)


def _number(value: object, kind: type) -> int | float:
    """One number of a non-string schedule as ``kind``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{value!r} is a {type(value).__name__}, not a number")
    if kind is int and not isinstance(value, numbers.Integral):
        raise ValueError(f"{value!r} is a {type(value).__name__}, not an integer")
    try:
        number = int(value) if kind is int else float(value) + 0.0  # + 0.0: -0.0 becomes 0.0
    except OverflowError:
        raise ValueError(f"{value!r} is too large to be finite") from None
    if kind is float and not math.isfinite(number):
        raise ValueError(f"{value!r} is not finite")
    if number < 0:
        raise ValueError(f"{value!r} is negative")
    return number


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

    Each schedule field also accepts a string such as ``"12-18-24"`` or ``"12,18,24"``, or one number; all three
    are read by :func:`parse_values`, which refuses negative, non-finite, boolean and (for layers and windows)
    non-integer values. The stages are the merge layers: a single window or ratio applies to every stage, e.g.
    ``LightKVConfig("12-18-24", "4-2-1", "0.3")`` merges 0.3 of each window at all three.
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
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"merge_layers must be distinct and ascending, got {layers}")
        if any(w < 1 for w in windows):
            raise ValueError(f"merge_windows must be >= 1, got {windows}")
        if any(r > 1.0 for r in ratios):
            raise ValueError(f"merge_ratios must lie in [0, 1], got {ratios}")
        stages = len(layers)
        if stages and len(windows) == 1:
            windows *= stages
        if stages and len(ratios) == 1:
            ratios *= stages
        if not (len(windows) == len(ratios) == stages):
            raise ValueError(
                f"merge_layers, merge_windows and merge_ratios need one entry per stage, got {stages}, "
                f"{len(windows)} and {len(ratios)} (a single window or ratio applies to every stage)"
            )
        object.__setattr__(self, "merge_layers", layers)
        object.__setattr__(self, "merge_windows", windows)
        object.__setattr__(self, "merge_ratios", ratios)
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
