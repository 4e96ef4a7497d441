"""The ``lightkv`` command line.

The core defines its own subcommands here (``simulate``, ``presets``, ``autotune``). Every other subcommand is a
:class:`Command` that the package owning it names in the ``lightkv.commands`` entry-point group of its distribution
(pyproject.toml): ``demo``, ``eval`` and ``calibrate`` in the reference adapter (adapters/reference/), ``bench`` in
perf/commands.py. So the core finds them without importing anything above it.

Only :class:`~lightkv_core.errors.UsageError` (a bad option value) and argparse's own errors become
``lightkv: error: ...`` with exit status 2; every other exception keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import NoReturn

import torch

from lightkv_core import autotune
from lightkv_core.budget import EFFECTS, MODEL_SHAPES, human_bytes, layer_kv_lengths, vision_retention
from lightkv_core.config import PRESET_DEPTHS, PRESETS, LightKVConfig, parse_values
from lightkv_core.errors import UsageError
from lightkv_core.stage import lightkv_stage

ENTRY_POINT_GROUP = "lightkv.commands"


@dataclass(frozen=True)
class Command:
    """One ``lightkv`` subcommand: ``add_arguments(parser)`` declares its options, ``run(args)`` returns the exit
    status. ``order`` places it in ``lightkv --help`` (then the name): the core's own take 10-30, the shipped
    packages' 40-70, so a third party's default of 1000 lists after them."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    order: int = 1000


class CommandLoadError(RuntimeError):
    """An entry point of ``lightkv.commands`` failed to load or is not a :class:`Command`, or two commands claim
    one name."""


def int_at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer ``>= minimum`` (and ``<= maximum`` if given), refused with a message naming
    the bound and the value otherwise."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"expected an integer <= {maximum}, got {text!r}")
        return value

    return convert


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


# ----------------------------------------------------------------------------------------------
# The core's commands


#: Deepest decoder ``lightkv simulate --num-layers`` takes (its KV table has one row per layer).
SIMULATE_MAX_LAYERS = 4096
#: Most tokens ``lightkv simulate`` generates, and most bytes its float32 hidden states, q and k may take.
SIMULATE_MAX_TOKENS = 1 << 20
SIMULATE_MAX_BYTES = 2 << 30
#: The seeds ``torch.Generator.manual_seed`` takes.
SEED_RANGE = (-(2**63), 2**64 - 1)


def _grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must look like 24x24, got {text!r}") from None
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"grid must be at least 1x1, got {text!r}")
    return rows, cols


def add_simulate_arguments(sim: argparse.ArgumentParser) -> None:
    sim.add_argument("--preset", choices=sorted(PRESETS), default="llava-1.5")
    sim.add_argument("--layout", choices=["default", "reference"], default="default")
    sim.add_argument("--guide", choices=["all_text", "prompt", "none"], default="all_text")
    sim.add_argument(
        "--layers",
        help="override merge_layers, one per stage: ascending decoder layers below --num-layers, separated by commas "
        "or dashes, e.g. 12,18,24 or 12-18-24",
    )
    sim.add_argument(
        "--windows", help="override merge_windows: integers >= 1, e.g. 4-2-1 or 4,2,1; one value applies to every stage"
    )
    sim.add_argument(
        "--ratios",
        help="override merge_ratios: numbers in [0, 1], e.g. 0.5-0.5-0.5 or 0.5,0.25,0.5; one value applies to every "
        "stage",
    )
    sim.add_argument(
        "--num-layers",
        type=int_at_least(1, SIMULATE_MAX_LAYERS),
        help="decoder depth (the preset's schedule is scaled to it unless --layers is given)",
    )
    sim.add_argument("--grid", type=_grid, help="image grid in tokens, e.g. 24x24")
    sim.add_argument("--images", type=positive_int, help="images per prompt")
    sim.add_argument("--text-before", type=non_negative_int, default=35, help="text tokens before the first image")
    sim.add_argument("--text-after", type=non_negative_int, default=30, help="text tokens after the last image")
    sim.add_argument("--hidden-size", type=positive_int, default=128, help="width of the generated hidden states")
    sim.add_argument("--heads", type=positive_int, default=4, help="query heads of the generated q")
    sim.add_argument("--head-dim", type=positive_int, default=32, help="head size of the generated q/k")
    sim.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto")
    sim.add_argument("--seed", type=int_at_least(*SEED_RANGE), default=0)


def _simulate_schedule(args: argparse.Namespace) -> tuple[LightKVConfig, int]:
    """The schedule and decoder depth the options ask for; a value the config refuses, or a merge layer at or past
    the depth, is a usage error."""
    depth = PRESET_DEPTHS[args.preset]
    num_layers = depth if args.num_layers is None else args.num_layers
    try:
        config = LightKVConfig.preset(args.preset, layout=args.layout, guide=args.guide)
        given = [
            parse_values(text, kind, flag) if text is not None else default
            for text, kind, flag, default in (
                (args.layers, int, "--layers", config.merge_layers),
                (args.windows, int, "--windows", config.merge_windows),
                (args.ratios, float, "--ratios", config.merge_ratios),
            )
        ]
        config = LightKVConfig(*given, guide=args.guide, layout=args.layout)
        if num_layers != depth and args.layers is None:
            config = config.scaled_to(num_layers, depth)
    except ValueError as error:
        raise UsageError(str(error)) from error
    beyond = [layer for layer in config.merge_layers if layer >= num_layers]
    if beyond:
        raise UsageError(
            f"--layers {beyond} lie beyond the {num_layers}-layer decoder (layers 0..{num_layers - 1}); "
            "give --num-layers for a deeper model"
        )
    return config, num_layers


def _check_input_size(seq: int, hidden_size: int, heads: int, kv_heads: int, head_dim: int) -> None:
    """UsageError unless the ``seq`` generated tokens are at most :data:`SIMULATE_MAX_TOKENS` and their float32 hidden
    states, q and k fit in :data:`SIMULATE_MAX_BYTES`."""
    if seq > SIMULATE_MAX_TOKENS:
        raise UsageError(
            f"--grid, --images and --text-before/--text-after ask for {seq} tokens, more than the "
            f"{SIMULATE_MAX_TOKENS} lightkv simulate generates"
        )
    size = 4 * seq * (hidden_size + (heads + kv_heads) * head_dim)
    if size > SIMULATE_MAX_BYTES:
        raise UsageError(
            f"the generated inputs ({seq} tokens of hidden size {hidden_size}, {heads} query and {kv_heads} key heads "
            f"of {head_dim}) would take {human_bytes(size)}, more than the {human_bytes(SIMULATE_MAX_BYTES)} lightkv "
            "simulate allows: lower --grid, --images, --text-before/--text-after, --hidden-size, --heads or --head-dim"
        )


def simulate(args: argparse.Namespace) -> int:
    """Run a schedule's stages on generated inputs and print token counts and KV bytes."""
    shape = MODEL_SHAPES[args.preset]
    config, num_layers = _simulate_schedule(args)
    kv_heads = args.heads // 2 or 1
    if args.heads % kv_heads:
        raise UsageError(
            f"--heads must be 1, 3 or even (the generated k has half as many heads, {kv_heads}, which must divide "
            f"it), got {args.heads}"
        )
    rows, cols = args.grid or shape.grid
    images = args.images or shape.images
    vision0 = images * rows * cols
    seq = args.text_before + vision0 + images - 1 + args.text_after  # one separator token between images
    _check_input_size(seq, args.hidden_size, args.heads, kv_heads, args.head_dim)

    generator = torch.Generator().manual_seed(args.seed)
    spans, position = [], args.text_before
    for _ in range(images):
        spans.append((position, position + rows * cols, rows, cols))
        position += rows * cols + 1
    guide_tokens = {"all_text": seq - vision0, "prompt": args.text_after}.get(config.guide, 1)
    if not guide_tokens and any(config.merge_ratios):
        where = "after the last image (--text-after)" if config.guide == "prompt" else "outside the images"
        raise UsageError(f"guide={config.guide!r} weighs the merges by the text tokens {where}, and there are none")
    hidden = torch.randn(1, seq, args.hidden_size, generator=generator)

    print(
        f"lightkv simulate: preset {args.preset}, {images} image(s) of {rows}x{cols} tokens, "
        f"{seq - vision0} text tokens, layout={config.layout}, guide={config.guide}"
    )
    print(
        f"schedule: layers {config.merge_layers}, windows {config.merge_windows}, ratios {config.merge_ratios} "
        f"({num_layers} decoder layers); random hidden/q/k, backend={args.backend}\n"
    )
    print(f"{'stage':>5} {'layer':>5} {'W':>3} {'rho':>5} {'tokens':>8} {'vision':>8} {'time':>9}")
    print(f"{'-':>5} {'-':>5} {'-':>3} {'-':>5} {seq:>8} {vision0:>8} {'':>9}")
    lengths = [seq]
    for index, (layer, window, ratio) in enumerate(
        zip(config.merge_layers, config.merge_windows, config.merge_ratios, strict=True)
    ):
        length = hidden.shape[1]
        q = torch.randn(1, args.heads, length, args.head_dim, generator=generator)
        k = torch.randn(1, kv_heads, length, args.head_dim, generator=generator)
        start = time.perf_counter()
        out = lightkv_stage(
            hidden, q, k, spans, window, ratio, guide=config.guide, layout=config.layout, backend=args.backend
        )
        elapsed = time.perf_counter() - start
        hidden, spans = out.hidden, out.spans
        lengths.append(hidden.shape[1])
        print(
            f"{index + 1:>5} {layer:>5} {window:>3} {ratio:>5.2f} {lengths[-1]:>8} {sum(s.length for s in spans):>8} "
            f"{elapsed * 1e3:>7.1f}ms"
        )

    text = seq - vision0
    print(
        f"\nKV cache of a {num_layers}-layer model with {shape.kv.kv_heads} KV heads x {shape.kv.head_dim}, "
        f"{shape.kv.bytes_per_value}-byte values:"
    )
    full_bytes = shape.kv.total_bytes([seq] * num_layers)
    vision_full = shape.kv.total_bytes([vision0] * num_layers)
    per_layer_by_effect = {
        effect: layer_kv_lengths(config.merge_layers, lengths, num_layers, effect) for effect in EFFECTS
    }
    for effect, per_layer in per_layer_by_effect.items():
        per_layer_vision = [n - text for n in per_layer]
        kv_bytes = shape.kv.total_bytes(per_layer)
        vision_kept = shape.kv.total_bytes(per_layer_vision)
        print(
            f"  merge takes effect {effect:>5} layer l: KV {human_bytes(full_bytes)} -> {human_bytes(kv_bytes)} "
            f"({kv_bytes / full_bytes:.1%}); vision KV {human_bytes(vision_full)} -> {human_bytes(vision_kept)}, "
            f"retention {vision_retention(per_layer_vision, vision0):.1%}"
        )
    print(f"  per-layer KV tokens (merge after layer l): {per_layer_by_effect['after']}")
    return 0


def _no_options(parser: argparse.ArgumentParser) -> None:
    """``lightkv presets`` takes no options."""


def presets(_: argparse.Namespace) -> int:
    """Print the released schedules."""
    for name, config in PRESETS.items():
        layers = "-".join(map(str, config.merge_layers))
        windows = "-".join(map(str, config.merge_windows))
        ratios = "-".join(map(str, config.merge_ratios))
        print(f"{name:<12} layers {layers:<9} windows {windows:<6} ratios {ratios:<12} ({PRESET_DEPTHS[name]} layers)")
    return 0


CORE_COMMANDS = (
    Command(
        "simulate",
        "run a schedule on generated inputs; print tokens and KV bytes",
        add_simulate_arguments,
        simulate,
        order=10,
    ),
    Command("presets", "list the released schedules", _no_options, presets, order=20),
    Command(
        "autotune",
        "tune the Triton kernels' launch configs on this GPU (per-device cache read at launch)",
        autotune.add_arguments,
        autotune.run,
        order=30,
    ),
)


# ----------------------------------------------------------------------------------------------
# Finding the commands and running one


def _origin(entry_point: EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    where = f" of distribution {dist.name} {dist.version}" if dist is not None else ""
    return f"entry point {entry_point.name} = {entry_point.value} (group {ENTRY_POINT_GROUP}{where})"


def load_commands() -> list[Command]:
    """The core's commands and those the ``lightkv.commands`` entry points name, in ``--help`` order.

    Raises:
        CommandLoadError: an entry point fails to import (chained to the import's exception) or is not a
            :class:`Command` under its own name, or two commands claim one name.
    """
    found: dict[str, tuple[Command, str]] = {c.name: (c, "lightkv_core.cli (built in)") for c in CORE_COMMANDS}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        origin = _origin(entry_point)
        if entry_point.name in found:
            raise CommandLoadError(
                f"two lightkv commands are named {entry_point.name!r}: {found[entry_point.name][1]} and {origin}"
            )
        try:
            command = entry_point.load()
        except Exception as error:
            raise CommandLoadError(f"{origin} failed to load: {type(error).__name__}: {error}") from error
        missing = [field for field in ("name", "help", "add_arguments", "run") if not hasattr(command, field)]
        if missing:
            raise CommandLoadError(f"{origin} is not a lightkv_core.cli.Command: {command!r} lacks {missing}")
        if command.name != entry_point.name:
            raise CommandLoadError(f"{origin} loads the command {command.name!r}, not {entry_point.name!r}")
        found[entry_point.name] = (command, origin)
    return sorted((command for command, _ in found.values()), key=lambda c: (getattr(c, "order", 1000), c.name))


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` (and, through ``add_subparsers``, its subcommands') whose errors are one line,
    ``lightkv: error: ...``, with exit status 2, like a :class:`~lightkv_core.errors.UsageError`."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"lightkv: error: {message} (see {self.prog} --help)\n")


def build_parser(commands: Iterable[Command] | None = None) -> argparse.ArgumentParser:
    """The ``lightkv`` parser, one subcommand per command (default: :func:`load_commands`)."""
    parser = _Parser(prog="lightkv", description="LightKV vision-token KV compression.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in load_commands() if commands is None else commands:
        command.add_arguments(subparsers.add_parser(command.name, help=command.help))
    return parser


def main(argv: list[str] | None = None) -> int:
    commands = {command.name: command for command in load_commands()}
    args = build_parser(commands.values()).parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return commands[args.command].run(args)
    except UsageError as error:
        print(f"lightkv: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run the importable module's main, so commands that import lightkv_core.cli share its classes with it.
    from lightkv_core.cli import main as _main

    sys.exit(_main())
