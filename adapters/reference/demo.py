"""``lightkv demo``: the shipped tiny LVLM answers held-out questions with and without LightKV.

Prints the answers side by side, each layer's KV tokens, the vision KV bytes, prefill time and the
accuracy on a larger held-out set. The LightKV schedule is the released LLaVA one scaled to the model.
"""

from __future__ import annotations

import argparse
import sys

import torch

from lightkv_adapters.reference import shapes_world as world
from lightkv_adapters.reference.quality import held_out, score
from lightkv_adapters.reference.tiny_lvlm import VISION_TOKENS, load_weights_option
from lightkv_core.budget import KVFootprint, human_bytes
from lightkv_core.cli import Command, positive_int
from lightkv_core.config import PRESET_DEPTHS, LightKVConfig
from lightkv_core.methods import LightKV


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    torch.manual_seed(0)
    model = load_weights_option(args.weights)
    layers = model.config.num_layers
    config = LightKVConfig.preset("llava-1.5").scaled_to(layers, PRESET_DEPTHS["llava-1.5"])
    methods = {"full cache": None, "LightKV": LightKV(config)}
    shown = held_out(args.show)
    accuracy_set = held_out(args.per_type)
    footprint = KVFootprint(model.config.num_kv_heads, model.config.head_dim, 4)

    print(f"tiny LVLM: {layers} layers, width {model.config.hidden_size}, {VISION_TOKENS} vision tokens (16x16)")
    print(f"LightKV schedule (released LLaVA 12-18-24 of 32 scaled to {layers} layers): merge_layers "
          f"{'-'.join(map(str, config.merge_layers))}, merge_windows {'-'.join(map(str, config.merge_windows))}, "
          f"merge_ratios {'-'.join(map(str, config.merge_ratios))}\n")  # fmt: skip
    answers, stats, scores = {}, {}, {}
    steps = len(methods) * (1 + -(-len(accuracy_set) // args.batch))
    with tqdm(total=steps, desc="demo", unit="batch", file=sys.stderr) as progress:
        for name, reduction in methods.items():
            answers[name], stats[name] = model.answer([e for e, _ in shown], [q for _, q in shown], reduction)
            progress.update(1)
            scores[name] = score(model, accuracy_set, reduction, args.batch, on_batch=lambda: progress.update(1))

    print(f"{'question':<58} {'truth':<34} {'full cache':<34} LightKV")
    for i, (_, question) in enumerate(shown):
        row = [" ".join(question.answer[:-1])] + [" ".join(answers[name][i][:-1]) for name in methods]
        marks = [("" if answers[name][i] == question.answer else " (x)") for name in methods]
        print(f"{' '.join(question.words):<58} {row[0]:<34} {row[1] + marks[0]:<34} {row[2] + marks[1]}")

    print("\nKV tokens per layer (first question; vision tokens in brackets):")
    print(f"{'layer':<12}" + "".join(f"{i:>10}" for i in range(layers)))
    for name in methods:
        kv, vision = stats[name].kv_tokens[:, 0].tolist(), stats[name].vision_tokens[:, 0].tolist()
        print(f"{name:<12}" + "".join(f"{f'{t} ({v})':>10}" for t, v in zip(kv, vision, strict=True)))

    full_vision = float(stats["full cache"].vision_tokens.sum()) / len(shown)
    print(f"\n{'':<12}{'vision KV/question':>20}{'retention':>11}{'prefill':>12}{'accuracy':>10}")
    for name in methods:
        vision = float(stats[name].vision_tokens.sum()) / len(shown)
        prefill_ms = scores[name].prefill_seconds / len(accuracy_set) * 1000
        print(f"{name:<12}{human_bytes(footprint.bytes_per_token_layer * vision):>20}"
              f"{vision / full_vision:>10.0%}{prefill_ms:>9.2f} ms{scores[name].accuracy:>10.1%}")  # fmt: skip
    print(f"\n(float32 KV of {model.config.num_kv_heads} KV heads x {model.config.head_dim} dims; prefill time per "
          f"question on this machine's CPU, batch {args.batch}; accuracy: exact match on {len(accuracy_set)} "
          f"held-out questions, {len(world.QUESTION_TYPES)} question types)")  # fmt: skip
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--show", type=positive_int, default=2, help="questions per type shown in the table")
    parser.add_argument(
        "--per-type", type=positive_int, default=50, help="held-out questions per type for the accuracy"
    )
    parser.add_argument("--batch", type=positive_int, default=100)
    parser.add_argument("--weights", default="", help="safetensors file (default: the shipped model)")


# Named in pyproject.toml's lightkv.commands entry points: the core's command line finds it there.
COMMAND = Command(
    "demo", "the shipped tiny LVLM answering questions with and without LightKV", add_arguments, run, order=40
)
