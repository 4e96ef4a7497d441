"""The ``lightkv`` command line."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from lightkv_core import autotune
from lightkv_core.budget import EFFECTS, MODEL_SHAPES, human_bytes, layer_kv_lengths, vision_retention
from lightkv_core.config import PRESET_DEPTHS, PRESETS, LightKVConfig
from lightkv_core.stage import lightkv_stage


def _grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must look like 24x24, got {text!r}") from None
    if rows < 1 or cols < 1:
        raise argparse.ArgumentTypeError(f"grid must be at least 1x1, got {text!r}")
    return rows, cols


def simulate(args: argparse.Namespace) -> int:
    """Run a schedule's stages on generated inputs and print token counts and KV bytes."""
    shape = MODEL_SHAPES[args.preset]
    config = LightKVConfig.preset(args.preset, layout=args.layout, guide=args.guide)
    if args.layers or args.windows or args.ratios:
        config = LightKVConfig(
            args.layers or config.merge_layers,
            args.windows or config.merge_windows,
            args.ratios or config.merge_ratios,
            guide=args.guide,
            layout=args.layout,
        )
    num_layers = args.num_layers or PRESET_DEPTHS[args.preset]
    if num_layers != PRESET_DEPTHS[args.preset] and not args.layers:
        config = config.scaled_to(num_layers, PRESET_DEPTHS[args.preset])
    rows, cols = args.grid or shape.grid
    images = args.images or shape.images

    generator = torch.Generator().manual_seed(args.seed)
    spans, position = [], args.text_before
    for _ in range(images):
        spans.append((position, position + rows * cols, rows, cols))
        position += rows * cols + 1  # one separator token between images
    seq = position - 1 + args.text_after
    vision0 = images * rows * cols
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
        k = torch.randn(1, args.heads // 2 or 1, length, args.head_dim, generator=generator)
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


def presets(_: argparse.Namespace) -> int:
    """Print the released schedules."""
    for name, config in PRESETS.items():
        layers = "-".join(map(str, config.merge_layers))
        windows = "-".join(map(str, config.merge_windows))
        ratios = "-".join(map(str, config.merge_ratios))
        print(f"{name:<12} layers {layers:<9} windows {windows:<6} ratios {ratios:<12} ({PRESET_DEPTHS[name]} layers)")
    return 0


def add_bench(commands: argparse._SubParsersAction) -> None:
    """``lightkv bench {scoring,kernels,prefill,all}``: the benchmarks of ``perf/`` (package ``lightkv_perf``)."""
    from lightkv_perf import kernels, prefill, scoring

    bench = commands.add_parser("bench", help="benchmarks: scoring kernel, grouping/merge kernels, end-to-end prefill")
    which = bench.add_subparsers(dest="benchmark", required=True)
    modules = {"scoring": scoring, "kernels": kernels, "prefill": prefill}
    for name, module in modules.items():
        sub = which.add_parser(name, help=module.__doc__.splitlines()[0])
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
    every = which.add_parser("all", help="the three benchmarks in turn, with their default shapes")
    every.add_argument("--quick", action="store_true", help="each benchmark's quick mode (the README's CPU run)")
    every.add_argument("--out", help="folder for the JSON and PNG results (default perf/results)")

    def run_all(args: argparse.Namespace) -> int:
        for name, module in modules.items():
            print(f"\n=== lightkv bench {name}{' --quick' if args.quick else ''} ===", flush=True)
            parser = argparse.ArgumentParser(prog=f"lightkv bench {name}")
            module.add_arguments(parser)
            options = ["--quick"] * args.quick + (["--out", args.out] if args.out else [])
            status = module.run(parser.parse_args(options))
            if status:
                return status
        return 0

    every.set_defaults(func=run_all)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightkv", description="LightKV vision-token KV compression.")
    commands = parser.add_subparsers(dest="command", required=True)

    sim = commands.add_parser("simulate", help="run a schedule on generated inputs; print tokens and KV bytes")
    sim.add_argument("--preset", choices=sorted(PRESETS), default="llava-1.5")
    sim.add_argument("--layout", choices=["default", "reference"], default="default")
    sim.add_argument("--guide", choices=["all_text", "prompt", "none"], default="all_text")
    sim.add_argument("--layers", help="override merge_layers, e.g. 12-18-24")
    sim.add_argument("--windows", help="override merge_windows, e.g. 4-2-1")
    sim.add_argument("--ratios", help="override merge_ratios, e.g. 0.5-0.5-0.5")
    sim.add_argument("--num-layers", type=int, help="decoder depth (the preset's schedule is scaled to it)")
    sim.add_argument("--grid", type=_grid, help="image grid in tokens, e.g. 24x24")
    sim.add_argument("--images", type=int, help="images per prompt")
    sim.add_argument("--text-before", type=int, default=35, help="text tokens before the first image")
    sim.add_argument("--text-after", type=int, default=30, help="text tokens after the last image")
    sim.add_argument("--hidden-size", type=int, default=128, help="width of the generated hidden states")
    sim.add_argument("--heads", type=int, default=4, help="query heads of the generated q")
    sim.add_argument("--head-dim", type=int, default=32, help="head size of the generated q/k")
    sim.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto")
    sim.add_argument("--seed", type=int, default=0)
    sim.set_defaults(func=simulate)

    pre = commands.add_parser("presets", help="list the released schedules")
    pre.set_defaults(func=presets)

    tune = commands.add_parser(
        "autotune", help="tune the Triton kernels' launch configs on this GPU (per-device cache read at launch)"
    )
    autotune.add_arguments(tune)
    tune.set_defaults(func=autotune.run)

    # The reference adapter ships in the same distribution; it is imported only when these commands run.
    from lightkv_adapters.reference import calibrate, demo, quality

    dem = commands.add_parser("demo", help="the shipped tiny LVLM answering questions with and without LightKV")
    demo.add_arguments(dem)
    dem.set_defaults(func=demo.run)

    ev = commands.add_parser("eval", help="quality benchmark: accuracy vs vision-token retention per method")
    quality.add_arguments(ev)
    ev.set_defaults(func=quality.run)

    add_bench(commands)

    cal = commands.add_parser("calibrate", help="PrefixKV: per-layer budget fractions from calibration prompts")
    calibrate.add_arguments(cal)
    cal.set_defaults(func=calibrate.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as error:
        print(f"lightkv: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
