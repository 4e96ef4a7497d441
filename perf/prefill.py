"""End-to-end prefill, stock vs LightKV, on the reference decoder and a Transformers LLaVA model.

The command line and the run: every (model, vision-token count) case, the JSON and PNG under ``--out``, the table.
The models and what is measured are described in the prefill section of ``perf/README.md``.

    lightkv bench prefill --quick                 # or python -m lightkv_perf.prefill
"""

from __future__ import annotations

import argparse
import gc
from dataclasses import asdict

import torch

from lightkv_core.config import PRESET_DEPTHS, PRESETS, LightKVConfig
from lightkv_core.errors import UsageError
from lightkv_core.kernels.launch import BACKENDS, choose_backend
from lightkv_core.methods import LightKV
from lightkv_perf.common import add_common_arguments, device, device_tag, output_dir, run_record, write_json
from lightkv_perf.prefill_cases import (
    SIZES,
    TEXT_AFTER,
    TEXT_BEFORE,
    build_hf,
    build_reference,
    hf_case,
    reference_case,
)
from lightkv_perf.prefill_measure import measure
from lightkv_perf.prefill_report import plot, table

MODELS = ("reference", "hf")
GPU_NOTE = (
    "GPU run: the clock is read after torch.cuda.synchronize() around every prefill; reduce_s is timed by the "
    "adapters, which synchronise before and after each stage."
)
CPU_NOTE = (
    "CPU run: absolute times only put the ratios in context; the ratios (LightKV / stock, measured side by side in "
    "one process) are what count. Absolute times come from a GPU."
)


def schedule_for(layers: int) -> LightKVConfig:
    """The released LLaVA schedule (12-18-24 / 4-2-1 / 0.5 at 32 layers) scaled to ``layers``."""
    return PRESETS["llava-1.5"].scaled_to(layers, PRESET_DEPTHS["llava-1.5"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (``--quick`` and ``--out`` included)."""
    add_common_arguments(parser)
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default=None,
        help="text model: small (width 1024, 16 layers) or 7b (LLaMA-7B shape); default 7b on a GPU, small on a "
        "CPU; tiny is for the tests",
    )
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument(
        "--vision-tokens",
        default=None,
        help="comma-separated vision-token counts, whole images of the size's grid (24x24: multiples of 576); "
        "default one and five images: 576,2880 (LLaVA-1.5, LLaVA-NeXT)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 5, --quick 1)")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="LightKV's kernels: auto (Triton on a GPU, the PyTorch fallbacks on a CPU), triton or torch",
    )


def parse_options(args: argparse.Namespace) -> tuple[list[str], str, list[int]]:
    """``(models, size name, vision-token counts)`` from the command line; UsageError naming a bad value."""
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        raise UsageError(f"--models: choose from {', '.join(MODELS)}, got {args.models!r}")
    size_name = args.size or ("7b" if device().type == "cuda" else "small")
    per_image = SIZES[size_name].image_tokens
    try:
        counts = [int(n) for n in (args.vision_tokens or f"{per_image},{5 * per_image}").split(",") if n.strip()]
    except ValueError:
        counts = []
    if not counts or any(n <= 0 or n % per_image for n in counts):
        raise UsageError(
            f"--vision-tokens: comma-separated positive multiples of {per_image} for this size, "
            f"got {args.vision_tokens!r}"
        )
    return models, size_name, counts


def run(args: argparse.Namespace) -> int:
    """Run every (model, vision-token count) case, write the JSON and PNG, print the table."""
    models, size_name, counts = parse_options(args)
    out = output_dir(args.out)
    on = device()
    size = SIZES[size_name]
    per_image = size.image_tokens
    dtype = torch.bfloat16 if on.type == "cuda" else torch.float32
    repeats = args.repeats or (1 if args.quick else 5)
    config = schedule_for(size.text.num_layers)
    method = LightKV(config, args.backend)
    builders = {"reference": (build_reference, reference_case), "hf": (build_hf, hf_case)}
    cases = []
    for name in models:
        build, case = builders[name]
        model = build(size, on, dtype)
        cases.extend(measure(case(model, size, n // per_image, method), repeats) for n in counts)
        del model  # one model on the device at a time
        gc.collect()
        if on.type == "cuda":
            torch.cuda.empty_cache()
    result = {
        **run_record("prefill"),
        "size": size_name,
        "text_model": {**asdict(size.text), "note": size.note},
        "dtype": str(dtype).removeprefix("torch."),
        "schedule": {
            "preset": "llava-1.5",
            "merge_layers": list(config.merge_layers),
            "merge_windows": list(config.merge_windows),
            "merge_ratios": list(config.merge_ratios),
            "backend": choose_backend(args.backend, on, "LightKV"),
        },
        "prompt": {"text_before": TEXT_BEFORE, "text_after": TEXT_AFTER, "image_grid": [size.image_side] * 2},
        "repeats": repeats,
        "cases": cases,
    }
    result["timing_note"] = CPU_NOTE if on.type == "cpu" else GPU_NOTE
    path = write_json(result, out / f"prefill-{device_tag()}.json")
    plot(result, path.with_suffix(".png"))
    print(table(result))
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightkv_perf.prefill", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
