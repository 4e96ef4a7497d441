"""Every method by name, so adapters and the CLI select one with a single word."""

from __future__ import annotations

from lightkv_core.config import PRESET_DEPTHS, PRESETS
from lightkv_core.methods.aircache import AirCache
from lightkv_core.methods.base import KVEviction, PrefillReduction
from lightkv_core.methods.eviction import DEFAULT_RETENTION
from lightkv_core.methods.fastv import FastV, drop_ratio, released_layer
from lightkv_core.methods.fields import check_fraction, check_integer
from lightkv_core.methods.lightkv import LightKV
from lightkv_core.methods.lookm import LookM
from lightkv_core.methods.prefixkv import PrefixKV
from lightkv_core.methods.random_drop import RandomDrop
from lightkv_core.methods.unguided import UnguidedMerge

CompressionMethod = PrefillReduction | KVEviction

METHODS: dict[str, type] = {
    "lightkv": LightKV,
    "unguided": UnguidedMerge,
    "fastv": FastV,
    "random": RandomDrop,
    "prefixkv": PrefixKV,
    "aircache": AirCache,
    "lookm": LookM,
}


def method_by_name(
    name: str, num_layers: int, *, preset: str = "llava-1.5", retention: float | None = None, backend: str = "auto"
) -> CompressionMethod:
    """Method ``name`` (a key of :data:`METHODS`) with its default settings for a ``num_layers``-deep model.

    * ``lightkv``, ``unguided``: the released schedule of ``preset`` scaled to the depth (their budget is
      the schedule; ``retention`` is refused).
    * ``fastv``, ``random``: prune after the released FastV layer (``K = 2`` of 32, scaled), dropping the
      released ``R = 0.5`` of the vision tokens, or the fraction that meets ``retention``.
    * ``prefixkv``, ``aircache``, ``lookm``: ``retention`` (default ``DEFAULT_RETENTION``, about what the
      released LightKV schedule keeps).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    check_integer("method_by_name", "num_layers", num_layers, 1)
    if retention is not None:
        check_fraction("method_by_name", "retention", retention)
    if name in ("lightkv", "unguided"):
        if retention is not None:
            raise ValueError(f"{name}'s budget is its schedule (merge_ratios); it takes no retention")
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
        return METHODS[name](PRESETS[preset].scaled_to(num_layers, PRESET_DEPTHS[preset]), backend)
    if name in ("fastv", "random"):
        layer = released_layer(num_layers)
        ratio = 0.5 if retention is None else drop_ratio(num_layers, layer, retention)
        if ratio is None:
            raise ValueError(f"{name} keeps every token up to layer {layer}: retention {retention} is out of reach")
        return FastV(layer, ratio, backend=backend) if name == "fastv" else RandomDrop(layer, ratio)
    return METHODS[name](retention=DEFAULT_RETENTION if retention is None else retention, backend=backend)
