"""Train the tiny LVLM on the shapes world (fixed seed, CPU, under 15 minutes on 2 cores).

    python -m lightkv_adapters.reference.train          # overwrites the shipped weights

Each training sequence is one image followed by all its questions with their answers
(``<bos> <image> x N q1 ? a1 . q2 ? a2 . ...``); the loss is cross-entropy on answer tokens only. The
curriculum (``--phases``) starts on 2 x 2-cell images (64 vision tokens, placed at random block-aligned
origins of the 16 x 16 position frame), then 3 x 3, and ends on the full 4 x 4 layout (256 tokens).
Training images use seeds from ``TRAIN_SEED_BASE`` on; the held-out sets use seeds below it.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from lightkv_adapters.reference import shapes_world as world
from lightkv_adapters.reference.quality import score
from lightkv_adapters.reference.tiny_lvlm import WEIGHTS, TinyLVLM
from lightkv_core.cli import non_negative_int, positive_int
from lightkv_core.errors import UsageError
from lightkv_core.run_record import RESULTS_HELP, output_file

TRAIN_SEED_BASE = 1_000_000
IGNORE = -100


def training_batch(model: TinyLVLM, seeds: range, cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embeds, labels)`` of a right-padded batch of ``cells x cells``-layout images; ``labels[b, i]`` is
    the answer token that slot ``i`` must predict, else ``IGNORE``. Smaller images sit at a random
    cell-aligned place of the 16 x 16 position frame."""
    examples = [world.make_example(s, cells) for s in seeds]
    grid = cells * world.CELL_PATCHES
    rng = np.random.default_rng(seeds[0])
    origins = rng.integers(0, world.CELLS - cells + 1, size=(len(examples), 2)) * world.CELL_PATCHES
    sequences, targets = [], []
    for example in examples:
        tokens = [world.BOS] + [world.IMAGE] * (grid * grid)
        labels = [IGNORE] * len(tokens)
        for question in example.questions:
            tokens += world.encode(question.words)
            labels += [IGNORE] * len(question.words)
            answer = world.encode(question.answer)
            labels[-1] = answer[0]
            tokens += answer
            labels += answer[1:] + [IGNORE]
        sequences.append(tokens)
        targets.append(labels)
    width = max(len(s) for s in sequences)
    label_tensor = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    prompts = []
    for b, (tokens, labels) in enumerate(zip(sequences, targets, strict=True)):
        prompts.append(tokens)
        label_tensor[b, : len(labels)] = torch.tensor(labels)
    batch = model.build_batch(prompts, np.stack([e.image for e in examples]), "right", origins)
    return batch.embeds, label_tensor


def evaluate(model: TinyLVLM, count: int) -> dict[str, float]:
    """Exact-match accuracy per question type on every question of the validation examples of seeds
    ``0 .. count - 1`` (apart from the training seeds and from the benchmark's held-out set)."""
    examples = [world.make_example(s) for s in range(count)]
    return score(model, [(e, q) for e in examples for q in e.questions], None, batch=64).per_type


def _positive_float(text: str) -> float:
    """An argparse ``type``: a finite number ``> 0``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a float, got {text!r}") from None
    if not (math.isfinite(value) and value > 0.0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0.0, got {text!r}")
    return value


def _phases(parser: argparse.ArgumentParser, text: str) -> list[tuple[int, int]]:
    """``--phases`` as ``(cells, steps)`` pairs: cells in 1..CELLS, steps >= 1, the last phase on the full layout."""
    try:
        phases = [tuple(int(v) for v in part.split(":")) for part in text.split(",")]
    except ValueError:
        parser.error(f"--phases: expected cells:steps,..., got {text!r}")
    for phase in phases:
        if len(phase) != 2 or not 1 <= phase[0] <= world.CELLS or phase[1] < 1:
            parser.error(
                f"--phases: each phase is cells:steps with cells in 1..{world.CELLS} and steps >= 1, got {text!r}"
            )
    if phases[-1][0] != world.CELLS:
        parser.error(f"--phases: the last phase must train on the full {world.CELLS}x{world.CELLS} layout")
    return phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        help=f"where to write the safetensors file (default tiny-lvlm.safetensors in {RESULTS_HELP}; pass --out "
        f"{WEIGHTS.relative_to(WEIGHTS.parents[3])} to replace the shipped weights)",
    )
    parser.add_argument(
        "--phases", default="2:450,3:250,4:300", help="curriculum: cells:steps,... (the last phase on 4x4 cells)"
    )
    parser.add_argument("--batch", type=positive_int, default=24)
    parser.add_argument("--lr", type=_positive_float, default=2e-3)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument(
        "--eval-every", type=non_negative_int, default=0, help="print held-out accuracy every N steps (0: never)"
    )
    args = parser.parse_args(argv)
    phases = _phases(parser, args.phases)
    try:
        args.out = output_file(args.out, "tiny-lvlm.safetensors")
    except UsageError as error:
        parser.error(str(error))
    plan = [cells for cells, steps in phases for _ in range(steps)]
    args.steps = len(plan)
    torch.manual_seed(args.seed)
    model = TinyLVLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    started = time.perf_counter()
    for step in range(args.steps):
        model.train()
        first = TRAIN_SEED_BASE + (args.seed * args.steps + step) * args.batch
        embeds, labels = training_batch(model, range(first, first + args.batch), plan[step])
        logits, _ = model.decoder(embeds)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 25 == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - started
            print(f"step {step:5d}  cells {plan[step]}  loss {loss.item():.4f}  {elapsed:6.0f}s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            model.eval()
            accuracy = evaluate(model, 48)
            print("  held-out", {k: round(v, 3) for k, v in accuracy.items()}, flush=True)
    seconds = time.perf_counter() - started
    model.eval()
    model.save(
        args.out,
        phases=args.phases,
        seed=str(args.seed),
        batch=str(args.batch),
        train_seconds=f"{seconds:.0f}",
        torch=torch.__version__,
    )
    print(f"saved {args.out} after {seconds:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
