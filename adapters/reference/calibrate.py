"""``lightkv calibrate``: PrefixKV's per-layer budget fractions, measured on calibration prompts.

    lightkv calibrate [--retention 0.3] [--scope vision] [--prompts 64] [--out FILE]

Runs the shipped tiny LVLM (or ``--weights``) with per-request PrefixKV on prompts from seeds that neither
training nor the held-out benchmark uses, and averages each layer's kept fraction of the candidate tokens
(vision tokens, or every token with ``--scope all``). ``PrefixKV.from_calibration(path)`` then splits any
request's budget over layers in those proportions, with no search at run time. The file goes to ``--out``, by
default ``prefixkv-calibration.json`` in the results folder (:func:`lightkv_core.run_record.results_dir`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from lightkv_adapters.reference import shapes_world as world
from lightkv_adapters.reference.tiny_lvlm import load_weights_option
from lightkv_core.cli import Command, positive_int
from lightkv_core.errors import UsageError
from lightkv_core.methods.prefixkv import PrefixKV, save_calibration
from lightkv_core.run_record import RESULTS_HELP, output_file
from lightkv_core.stats import PrefillStats

CALIBRATION_SEED_BASE = 200_000
DEFAULT_FILE = "prefixkv-calibration.json"


def layer_fractions(stats: PrefillStats, scope: str) -> np.ndarray:
    """``(B, layers)`` kept fraction of each sample's candidates per layer, from a prefill's counts."""
    if scope == "vision":
        return (stats.vision_tokens.double() / stats.original_vision_tokens.double()).T.numpy()
    return (stats.kv_tokens.double() / stats.original_tokens.double()).T.numpy()


def run(args: argparse.Namespace) -> int:
    if args.prompts < 1:
        raise UsageError(f"--prompts must be >= 1, got {args.prompts}")
    try:
        method = PrefixKV(retention=args.retention, scope=args.scope, sink=args.sink, backend=args.backend)
    except ValueError as error:  # --retention, --sink
        raise UsageError(str(error)) from error
    out = output_file(args.out, DEFAULT_FILE)
    torch.manual_seed(0)
    model = load_weights_option(args.weights)
    pairs = []
    seed = CALIBRATION_SEED_BASE
    while len(pairs) < args.prompts:
        example = world.make_example(seed)
        pairs += [(example, question) for question in example.questions][: args.prompts - len(pairs)]
        seed += 1
    fractions = []
    for start in range(0, len(pairs), args.batch):
        chunk = pairs[start : start + args.batch]
        _, stats = model.answer([e for e, _ in chunk], [q for _, q in chunk], method)
        fractions.append(layer_fractions(stats, args.scope))
    mean = np.concatenate(fractions).mean(axis=0)
    save_calibration(out, mean.tolist(), method, len(pairs), str(args.weights or "shipped tiny LVLM"))
    print(f"PrefixKV calibration at retention {args.retention} ({args.scope} tokens), {len(pairs)} prompts:")
    print("layer  kept fraction")
    for layer, fraction in enumerate(mean):
        print(f"{layer:>5}  {fraction:.3f}")
    print(f"wrote {out}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retention", type=float, default=0.3, help="retention the prompts are compressed at")
    parser.add_argument("--scope", choices=["vision", "all"], default="vision", help="tokens PrefixKV may evict")
    parser.add_argument("--sink", type=int, default=4, help="first tokens always kept")
    parser.add_argument("--prompts", type=int, default=64, help="calibration prompts")
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--backend", choices=["auto", "triton", "torch"], default="auto", help="statistics kernel")
    parser.add_argument("--weights", default="", help="safetensors file (default: the shipped model)")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"calibration file to write (default {DEFAULT_FILE} in {RESULTS_HELP})"
    )


# Named in pyproject.toml's lightkv.commands entry points: the core's command line finds it there.
COMMAND = Command(
    "calibrate", "PrefixKV: per-layer budget fractions from calibration prompts", add_arguments, run, order=70
)
