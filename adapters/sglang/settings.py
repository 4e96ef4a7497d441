"""What ``--kv-compress`` asked for, carried on SGLang's ``ServerArgs`` into every subprocess.

The settings ride on the server arguments as the non-field attribute :data:`SETTINGS_ATTRIBUTE`
(SGLang pickles a record's non-field attributes along with its fields). A model reads them back at
construction with :func:`settings_of` and turns them into a :class:`~lightkv_core.methods.PrefillReduction`
for its own depth and family with :meth:`KVCompressSettings.reduction`.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightkv_core.config import PRESET_DEPTHS, PRESETS, LightKVConfig, parse_values
from lightkv_core.methods import FastV, LightKV, PrefillReduction
from lightkv_core.methods.fastv import released_layer

#: Values of ``--kv-compress``.
KV_COMPRESS_METHODS = ("none", "lightkv", "fastv")

#: Name of the attribute of ``ServerArgs`` that holds the :class:`KVCompressSettings`.
SETTINGS_ATTRIBUTE = "_lightkv_kv_compress"

#: The released FastV drop ratio (R = 50% of the vision tokens).
FASTV_RATIO = 0.5


@dataclass(frozen=True)
class KVCompressSettings:
    """One server's compression settings.

    Attributes:
        method: ``"none"``, ``"lightkv"`` or ``"fastv"``.
        layers: decoder layers (0-based) whose output is compressed; ``None`` takes the model family's
            released schedule scaled to its depth (LightKV) or the released FastV layer (K = 2 of 32, scaled).
        windows: LightKV windows per image side, one per layer; ``None`` takes the preset's.
        ratios: fraction of each window's tokens merged per stage (LightKV), or the one fraction of vision
            tokens dropped (FastV); ``None`` takes the released values.
        grouped_pools: give each layer group between two reduce layers its own, smaller KV pool
            (:mod:`lightkv_adapters.sglang.pools`), so compression frees memory; ``False`` keeps SGLang's single
            pool (compression then saves compute only).
        pool_ratios: slots of each layer group after the first per slot of group 0; ``None`` derives them from
            the schedule for vision-dominated prompts (:func:`lightkv_adapters.sglang.pools.default_pool_ratios`).
    """

    method: str = "none"
    layers: tuple[int, ...] | None = None
    windows: tuple[int, ...] | None = None
    ratios: tuple[float, ...] | None = None
    grouped_pools: bool = True
    pool_ratios: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.method not in KV_COMPRESS_METHODS:
            raise ValueError(f"--kv-compress must be one of {', '.join(KV_COMPRESS_METHODS)}, got {self.method!r}")
        given = {
            name: value
            for name, value in (("layers", self.layers), ("windows", self.windows), ("ratios", self.ratios))
            if value is not None
        }
        if self.pool_ratios is not None:
            given["pool-ratios"] = self.pool_ratios
            if not self.grouped_pools:
                raise ValueError("--kv-compress-pool-ratios gives either ratios or 'off', not both")
            if any(not 0.0 < ratio <= 1.0 for ratio in self.pool_ratios):
                raise ValueError(f"--kv-compress-pool-ratios must lie in (0, 1], got {self.pool_ratios}")
        if self.method == "none" and given:
            raise ValueError(f"--kv-compress-{'/'.join(given)} need --kv-compress lightkv or fastv")
        if self.method == "fastv":
            if self.windows is not None:
                raise ValueError("--kv-compress-windows is a LightKV setting; FastV has no windows")
            for name in ("layers", "ratios"):
                if name in given and len(given[name]) != 1:
                    raise ValueError(f"FastV prunes once: --kv-compress-{name} takes one value, got {given[name]}")
        stage_lists = {name: value for name, value in given.items() if name != "pool-ratios"}
        if self.method == "lightkv" and len(stage_lists) > 1:
            lengths = {name: len(value) for name, value in stage_lists.items()}
            if len(set(lengths.values())) > 1:
                raise ValueError(f"--kv-compress-layers/-windows/-ratios need one value per stage, got {lengths}")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    def reduction(self, preset: str, num_layers: int) -> PrefillReduction | None:
        """The method for a ``num_layers``-deep model of the family whose released schedule is ``preset``
        (a key of :data:`lightkv_core.config.PRESETS`); ``None`` for ``"none"``.

        Raises:
            ValueError if the schedule does not fit the model (a layer past its depth, a stage that the
            preset's stage count cannot fill in).
        """
        if self.method == "none":
            return None
        if self.method == "fastv":
            layer = self.layers[0] if self.layers is not None else released_layer(num_layers)
            _check_layers((layer,), num_layers)
            return FastV(layer, self.ratios[0] if self.ratios is not None else FASTV_RATIO)
        released = PRESETS[preset].scaled_to(num_layers, PRESET_DEPTHS[preset])
        stages = len(next(v for v in (self.layers, self.windows, self.ratios, released.merge_layers) if v))
        fields = {}
        for name, value, default in (
            ("merge_layers", self.layers, released.merge_layers),
            ("merge_windows", self.windows, released.merge_windows),
            ("merge_ratios", self.ratios, released.merge_ratios),
        ):
            if value is None and len(default) != stages:
                raise ValueError(
                    f"the {preset} preset has {len(default)} stages; give {name.replace('merge_', '--kv-compress-')} "
                    f"for the {stages} stages asked for"
                )
            fields[name] = value if value is not None else default
        config = LightKVConfig(**fields)
        _check_layers(config.merge_layers, num_layers)
        return LightKV(config)


def _check_layers(layers: tuple[int, ...], num_layers: int) -> None:
    late = [layer for layer in layers if layer >= num_layers - 1]
    if late:
        raise ValueError(
            f"--kv-compress-layers {late} leave no later layer to shorten in a {num_layers}-layer model "
            f"(use layers 0..{num_layers - 2})"
        )


def parse_list(text: str, kind: type, flag: str) -> tuple:
    """``"12,18,24"`` (commas or dashes) as a tuple of ``kind``.

    Raises:
        ValueError naming ``flag`` if an item does not parse.
    """
    try:
        return parse_values(text, kind, flag)
    except ValueError:
        raise ValueError(f"{flag} takes a comma-separated list of {kind.__name__}s, got {text!r}") from None


def settings_of(server_args: object) -> KVCompressSettings:
    """The settings attached to ``server_args`` (``method="none"`` if none are)."""
    settings = getattr(server_args, SETTINGS_ATTRIBUTE, None)
    return settings if settings is not None else KVCompressSettings()
