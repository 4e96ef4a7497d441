"""Which compression method ``apply_lightkv``'s ``config`` argument names for a model, checked against it."""

from __future__ import annotations

from lightkv_adapters.hf.families import Family
from lightkv_core.config import PRESET_DEPTHS, PRESETS, LightKVConfig
from lightkv_core.kernels.launch import check_backend
from lightkv_core.methods import METHODS, CompressionMethod, KVEviction, LightKV, PrefillReduction, method_by_name


def method_for(
    family: Family, depth: int, config: LightKVConfig | CompressionMethod | str | None, backend: str
) -> CompressionMethod:
    """The method ``config`` names (see :func:`~lightkv_adapters.hf.apply.apply_lightkv`) for a ``depth``-layer text
    model of ``family``, checked to fit it (``backend`` too, even where a method instance makes it unused)."""
    check_backend("apply_lightkv", backend)
    if isinstance(config, str) and config.lower() in METHODS:
        config = method_by_name(config.lower(), depth, preset=family.preset, backend=backend)
    elif config is None or isinstance(config, str):
        preset = family.preset if config is None else config.lower().replace("_", "-")
        if preset not in PRESETS:
            raise ValueError(
                f"unknown preset or method {config!r}; presets: {', '.join(sorted(PRESETS))}; methods: "
                f"{', '.join(METHODS)}"
            )
        config = PRESETS[preset].scaled_to(depth, PRESET_DEPTHS[preset])
    method = LightKV(config, backend) if isinstance(config, LightKVConfig) else config
    if isinstance(method, KVEviction):
        return method
    if not isinstance(method, PrefillReduction):
        raise TypeError(
            f"config must be a LightKVConfig, a preset or method name, a PrefillReduction or a KVEviction, got "
            f"{type(config)}"
        )
    if method.position_mode != "original":
        raise ValueError(
            "the transformers adapter needs positions='original' (generate() numbers new tokens from the "
            f"uncompressed length); this method uses {method.position_mode!r}"
        )
    layers = method.reduce_layers
    if not layers or min(layers) < 0 or max(layers) >= depth:
        raise ValueError(f"reduction layers {layers} must lie in [0, {depth}) for this {depth}-layer text model")
    return method
