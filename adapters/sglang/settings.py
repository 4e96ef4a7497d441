"""``--kv-compress*``: the flags, the :class:`KVCompressSettings` they ask for, and their ride on ``ServerArgs``.

The settings are checked against the other server arguments (:mod:`~lightkv_adapters.sglang.validation`) and
attached to ``ServerArgs`` as the non-field attribute :data:`SETTINGS_ATTRIBUTE`, which SGLang pickles into every
subprocess; a model reads them back with :func:`settings_of`. The flags and their defaults: README (SGLang).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from lightkv_adapters.sglang.validation import validate
from lightkv_core.config import PRESET_DEPTHS, PRESETS, LightKVConfig, parse_values
from lightkv_core.methods import FastV, LightKV, PrefillReduction
from lightkv_core.methods.fastv import released_layer

if TYPE_CHECKING:
    from sglang.srt.server_args import ServerArgs

#: Values of ``--kv-compress``.
KV_COMPRESS_METHODS = ("none", "lightkv", "fastv")

#: Name of the attribute of ``ServerArgs`` that holds the :class:`KVCompressSettings`.
SETTINGS_ATTRIBUTE = "_lightkv_kv_compress"

#: The released FastV drop ratio (R = 50% of the vision tokens).
FASTV_RATIO = 0.5

#: Keyword arguments (``Engine``) and ``argparse`` destinations of the ``--kv-compress*`` flags.
KV_COMPRESS_KWARGS = (
    "kv_compress",
    "kv_compress_layers",
    "kv_compress_windows",
    "kv_compress_ratios",
    "kv_compress_pool_ratios",
)
#: Words ``--kv-compress-pool-ratios`` takes besides a list of ratios.
POOL_RATIO_WORDS = ("shared", "off")


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
        grouped_pools: give each layer group between two reduce layers its own KV slots
            (:mod:`lightkv_adapters.sglang.pools`), so compression frees memory; ``False`` keeps SGLang's single
            pool (compression then saves compute only).
        pool_ratios: fixed pools with these slots of each layer group after the first per slot of group 0;
            ``None``: the groups share one arena of pages (:mod:`lightkv_adapters.sglang.arena`).

    The four lists also accept what :func:`parse_list` reads (e.g. ``"12,18,24"``) and are stored as tuples. With
    ``"lightkv"`` the stages are the layers (the preset's if not given): a single window or ratio applies to every
    stage, e.g. ``--kv-compress-ratios 0.3``.
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
        given = {}  # flag suffix: the values given
        for field, kind in (("layers", int), ("windows", int), ("ratios", float), ("pool_ratios", float)):
            name = field.replace("_", "-")
            value = parse_list(getattr(self, field), kind, f"--kv-compress-{name}")
            object.__setattr__(self, field, value)
            if value is not None:
                given[name] = value
        if self.pool_ratios is not None:
            if not self.grouped_pools:
                raise ValueError("--kv-compress-pool-ratios gives either ratios or 'off', not both")
            if any(not 0.0 < ratio <= 1.0 for ratio in self.pool_ratios):
                raise ValueError(f"--kv-compress-pool-ratios must lie in (0, 1], got {self.pool_ratios}")
        if self.windows is not None and min(self.windows) < 1:
            raise ValueError(f"--kv-compress-windows must be >= 1, got {self.windows}")
        if self.ratios is not None and max(self.ratios) > 1.0:
            raise ValueError(f"--kv-compress-ratios must lie in [0, 1], got {self.ratios}")
        if self.method == "none" and given:
            raise ValueError(f"--kv-compress-{'/'.join(given)} need --kv-compress lightkv or fastv")
        if self.method == "fastv":
            if self.windows is not None:
                raise ValueError("--kv-compress-windows is a LightKV setting; FastV has no windows")
            for name in ("layers", "ratios"):
                if name in given and len(given[name]) != 1:
                    raise ValueError(f"FastV prunes once: --kv-compress-{name} takes one value, got {given[name]}")
        if self.method == "lightkv":
            lengths = {name: len(value) for name, value in given.items() if name != "pool-ratios"}
            stages = lengths.get("layers", max(lengths.values(), default=1))
            if any(n != stages and (name == "layers" or n != 1) for name, n in lengths.items()):
                raise ValueError(
                    f"--kv-compress-layers/-windows/-ratios need one value per stage (a single window or ratio "
                    f"applies to every stage), got {lengths}"
                )

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
        # the stages: the layers given, else the longest of the windows and ratios given (one of either applies to
        # every stage), else the preset's
        lists = [len(value) for value in (self.windows, self.ratios) if value is not None and len(value) > 1]
        stages = len(self.layers) if self.layers is not None else max(lists, default=len(released.merge_layers))
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


# --- values ----------------------------------------------------------------------------------------------------


def kv_compress_settings(
    kv_compress: str = "none",
    kv_compress_layers: str | Iterable[int] | int | None = None,
    kv_compress_windows: str | Iterable[int] | int | None = None,
    kv_compress_ratios: str | Iterable[float] | float | None = None,
    kv_compress_pool_ratios: str | Iterable[float] | float | None = None,
) -> KVCompressSettings:
    """The settings the ``--kv-compress*`` flags (or ``Engine`` keyword arguments of the same names) ask for.
    Lists are comma-separated strings, sequences or single numbers; ``kv_compress_pool_ratios`` also takes
    ``"shared"`` (the default) or ``"off"``.

    Raises:
        ValueError naming the flag whose value is wrong.
    """
    words = isinstance(kv_compress_pool_ratios, str) and kv_compress_pool_ratios.lower() in POOL_RATIO_WORDS
    return KVCompressSettings(
        kv_compress,
        kv_compress_layers,
        kv_compress_windows,
        kv_compress_ratios,
        grouped_pools=not (words and kv_compress_pool_ratios.lower() == "off"),
        pool_ratios=None if words else kv_compress_pool_ratios,
    )


def parse_list(value: str | Iterable | float | None, kind: type, flag: str) -> tuple | None:
    """``value`` as a non-empty tuple of ``kind`` (``None`` stays ``None``), read by the schedules' one parser,
    :func:`lightkv_core.config.parse_values`: a string such as ``"12,18,24"`` (or ``"12-18-24"``), a sequence or a
    single number; negative, non-finite and boolean values, and fractional ones for an ``int`` list, are refused.

    Raises:
        ValueError naming ``flag`` and the value if an item does not convert or there is none.
    """
    if value is None:
        return None
    items = parse_values(value, kind, flag)
    if not items:
        raise ValueError(f"{flag} needs at least one value, got {value!r}")
    return items


def settings_of(server_args: object) -> KVCompressSettings:
    """The settings attached to ``server_args`` (``method="none"`` if none are)."""
    settings = getattr(server_args, SETTINGS_ATTRIBUTE, None)
    return settings if settings is not None else KVCompressSettings()


def attach_settings(server_args: ServerArgs, settings: KVCompressSettings) -> None:
    """Checks ``settings`` against ``server_args`` (:func:`~lightkv_adapters.sglang.validation.validate`), then
    attaches them as the non-field attribute :data:`SETTINGS_ATTRIBUTE`, which ``ServerArgs`` keeps through
    pickling into SGLang's subprocesses and through resolution."""
    validate(server_args, settings)
    msgspec.Struct.__setattr__(server_args, SETTINGS_ATTRIBUTE, settings)


# --- command line ----------------------------------------------------------------------------------------------


def add_kv_compress_args(parser: argparse.ArgumentParser) -> None:
    """Adds the ``--kv-compress*`` argument group to ``parser``."""
    group = parser.add_argument_group(
        "KV cache compression (lightkv)",
        "Shrink the vision tokens' KV cache during prefill (Qwen2-VL, Qwen2.5-VL, LLaVA on Llama or Qwen2). "
        "Needs --cuda-graph-backend-prefill disabled, --attention-backend triton (GPU) or torch_native (CPU), "
        "and --cuda-graph-backend-decode disabled unless LIGHTKV_CUDA_GRAPH_DECODE=1 (decode graphs on triton, not "
        "yet run on a GPU); no pipeline parallelism, data-parallel attention or speculative decoding.",
    )
    group.add_argument(
        "--kv-compress",
        choices=KV_COMPRESS_METHODS,
        default="none",
        help="'lightkv': merge similar vision tokens at a few decoder layers, guided by the prompt's attention "
        "to them (LightKV); 'fastv': drop the vision tokens the prompt attends to least, once (FastV); "
        "'none' (default): leave the model as it is.",
    )
    group.add_argument(
        "--kv-compress-layers",
        type=_cli_list(int, "--kv-compress-layers"),
        default=None,
        help="Comma-separated 0-based decoder layers whose output is compressed, e.g. 12,18,24 (LightKV: one per "
        "stage; FastV: one layer). Default: the model family's released schedule scaled to its depth.",
    )
    group.add_argument(
        "--kv-compress-windows",
        type=_cli_list(int, "--kv-compress-windows"),
        default=None,
        help="LightKV only: comma-separated windows per image side, one per stage, e.g. 4,2,1; one value applies to "
        "every stage. Default: the model family's released schedule.",
    )
    group.add_argument(
        "--kv-compress-ratios",
        type=_cli_list(float, "--kv-compress-ratios"),
        default=None,
        help="LightKV: comma-separated fraction in [0, 1] of each window's tokens merged per stage, e.g. 0.5,0.5,0.5 "
        "(one value applies to every stage); FastV: the one fraction of vision tokens dropped, e.g. 0.5. "
        "Default: the released values.",
    )
    group.add_argument(
        "--kv-compress-pool-ratios",
        type=_pool_ratios_arg,
        default=None,
        help="Each layer group between two compressed layers holds its own KV slots, so compression frees memory. "
        "'shared' (default): the groups draw pages from one arena, so any mix of text-only and image requests "
        "holds at least as many requests as one pool; comma-separated ratios, e.g. 0.52,0.28,0.16: fixed pools "
        "with that many slots of each group after the first per slot of the first (for a known, fixed mix); "
        "'off': one pool for all layers (compression then saves compute, not memory).",
    )


def _pool_ratios_arg(text: str) -> str | tuple:
    """``argparse`` type of ``--kv-compress-pool-ratios``: ``shared``, ``off`` or a list of ratios."""
    if text.strip().lower() in POOL_RATIO_WORDS:
        return text.strip().lower()
    return _cli_list(float, "--kv-compress-pool-ratios")(text)


def _cli_list(kind: type, flag: str) -> Callable[[str], tuple]:
    """``argparse`` type for a comma-separated list of ``kind`` (:func:`parse_list`), reporting a bad value as a
    usage error."""

    def parse(text: str) -> tuple:
        try:
            return parse_list(text, kind, flag)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def add_cli_args_hook(result: None, parser: argparse.ArgumentParser) -> None:
    """Hook after ``ServerArgs.add_cli_args(parser)``: adds the ``--kv-compress*`` flags to SGLang's parser."""
    add_kv_compress_args(parser)


def from_cli_args_hook(server_args: ServerArgs, cls: type, namespace: argparse.Namespace) -> None:
    """Hook after ``ServerArgs.from_cli_args(namespace)`` (command line or ``--config`` file): attaches the parsed
    ``--kv-compress*`` flags (a namespace from another parser, without them, gets ``none``)."""
    values = {name: getattr(namespace, name) for name in KV_COMPRESS_KWARGS if hasattr(namespace, name)}
    attach_settings(server_args, kv_compress_settings(**values))
