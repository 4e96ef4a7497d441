"""Prompt-to-vision scoring: the Triton kernel vs the released code's eager approach vs plain PyTorch.

Implementations ``eager``, ``column_softmax``, ``torch`` (lightkv's fallback) and ``triton`` (GPU only), each checked
against ``torch`` before it is timed. What each does, what is measured and the recorded results:
``perf/README.md``, "Scoring kernel".

    lightkv bench scoring [--quick]      # quick: on a CPU, eager once per shape and not above S=2880
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

import torch

from lightkv_core.errors import UsageError
from lightkv_core.kernels import agreement, cross_attention_scores
from lightkv_perf import roofline
from lightkv_perf.common import (
    add_common_arguments,
    device,
    device_tag,
    median_seconds,
    output_dir,
    peak_extra_bytes,
    run_record,
    write_json,
)

SEQ_LENGTHS = (640, 1200, 2880, 6000)
GUIDE_TOKENS = (32, 128)
HEADS, HEAD_DIM = 32, 128
QUICK_EAGER_LIMIT = 2880  # on a CPU, --quick skips eager above this (about a minute per call at S=6000)
GPU_DTYPE = torch.float16  # q and k on a GPU, and the dtype of the roofline (on a CPU too)


def eager(q: torch.Tensor, k: torch.Tensor, guides: torch.Tensor, scale: float) -> torch.Tensor:
    """The released approach: ``(H, S, S)`` logits, softmax over queries, guide columns, sum -> ``(S,)``."""
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale  # (H, S, S)
    return logits.float().softmax(dim=-2)[:, :, guides].sum(dim=(0, 2))


def column_softmax(q: torch.Tensor, k: torch.Tensor, guides: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain PyTorch: ``(H, S, T)`` logits against the guide keys, softmax over queries, sum -> ``(S,)``."""
    logits = torch.matmul(q, k[:, guides].transpose(-1, -2)) * scale  # (H, S, T)
    return logits.float().softmax(dim=-2).sum(dim=(0, 2))


def implementations(
    q: torch.Tensor, k: torch.Tensor, guides: torch.Tensor, with_triton: bool
) -> dict[str, Callable[[], torch.Tensor]]:
    """``impl -> fn()`` for ``q``, ``k`` of shape ``(H, S, d)`` and guide positions ``guides`` ``(T,)``; every
    ``fn`` returns the ``(S,)`` float32 scores."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    mask = torch.ones(1, q.shape[1], dtype=torch.bool, device=q.device)
    guide_index, guide_count = guides[None], torch.tensor([guides.numel()], device=q.device)

    def library(backend: str) -> Callable[[], torch.Tensor]:
        return lambda: cross_attention_scores(q[None], k[None], guide_index, guide_count, mask, scale, backend=backend)[
            0
        ]

    impls = {
        "eager": lambda: eager(q, k, guides, scale),
        "column_softmax": lambda: column_softmax(q, k, guides, scale),
        "torch": library("torch"),
    }
    if with_triton:
        impls["triton"] = library("triton")
    return impls


def copy_bandwidth() -> float:
    """Device memory bandwidth in bytes/s: a 1 GiB device-to-device copy (read + write) timed by ``do_bench``."""
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    seconds = median_seconds(lambda: target.copy_(source), repeats=1)
    return 2 * source.numel() / seconds


def floor_bytes(seq: int, guide_tokens: int, heads: int, kv_heads: int, head_dim: int, element: int) -> int:
    """Bytes any scoring must move at least, reading everything once: all queries, the guide tokens' keys, the
    float32 output (``element`` bytes per q/k value). The Triton kernel's two passes move about twice this
    (:func:`lightkv_perf.roofline.scoring_cost`)."""
    return heads * seq * head_dim * element + kv_heads * guide_tokens * head_dim * element + seq * 4


def roofline_entries(args: argparse.Namespace, run_on: torch.device) -> list[dict]:
    """Per (S, T): the Triton kernel's roofline record in :data:`GPU_DTYPE` with the configs it launches with on
    ``run_on`` (:func:`lightkv_perf.roofline.scoring_roofline`), and ``once_bytes`` (:func:`floor_bytes`)."""
    element = GPU_DTYPE.itemsize
    return [
        {
            "S": seq,
            "T": guides,
            "once_bytes": floor_bytes(seq, guides, args.heads, args.heads, args.head_dim, element),
            **roofline.scoring_roofline(seq, guides, args.heads, args.heads, args.head_dim, GPU_DTYPE, run_on),
        }
        for seq in args.seq_lengths
        for guides in args.guide_tokens
    ]


def measure(args: argparse.Namespace) -> dict:
    run_on = device()
    on_gpu = run_on.type == "cuda"
    dtype = GPU_DTYPE if on_gpu else torch.float32
    rows, skipped = [], []
    for seq in args.seq_lengths:
        generator = torch.Generator().manual_seed(seq)
        q = torch.randn(args.heads, seq, args.head_dim, generator=generator).to(run_on, dtype)
        k = torch.randn(args.heads, seq, args.head_dim, generator=generator).to(run_on, dtype)
        for guide_tokens in args.guide_tokens:
            guides = torch.arange(seq - guide_tokens, seq, device=run_on)
            impls = implementations(q, k, guides, with_triton=on_gpu)
            reference = impls["torch"]()
            for impl, fn in impls.items():
                if impl == "eager" and args.quick and not on_gpu and seq > QUICK_EAGER_LIMIT:
                    skipped.append({"S": seq, "T": guide_tokens, "impl": impl, "why": "--quick on a CPU"})
                    continue
                # the library's kernels compute in float32; eager and column_softmax round their logits to dtype
                rounded_to = None if impl in ("torch", "triton") else (dtype, 1)
                agreement.check_scores(fn(), reference, q, k, q.shape[-1] ** -0.5, guide_tokens, rounded_to)
                slow = impl == "eager" and not on_gpu
                seconds = median_seconds(
                    fn, repeats=1 if slow and args.quick else args.repeats, warmup=0 if slow else 1
                )
                row = {"S": seq, "H": args.heads, "T": guide_tokens, "impl": impl, "time_s": seconds}
                row["peak_bytes"] = peak_extra_bytes(fn)
                rows.append(row)
                print(
                    f"S={seq:>5} T={guide_tokens:>3} {impl:<15} {seconds * 1e3:>10.3f} ms "
                    f"{row['peak_bytes'] / 2**20:>10.1f} MiB",
                    flush=True,
                )
            del impls, reference
    result = run_record("scoring")
    result.update(
        {
            "dtype": str(dtype).removeprefix("torch."),
            "heads": args.heads,
            "kv_heads": args.heads,
            "head_dim": args.head_dim,
            "rows": rows,
            "skipped": skipped,
            "ratios": ratios(rows),
            "roofline": roofline_entries(args, run_on),
        }
    )
    if on_gpu:
        result["copy_bandwidth_bytes_per_s"] = copy_bandwidth()
        result["targets"] = roofline.as_dicts(roofline.scoring_targets(result))
    else:
        result["note"] = (
            "CPU run: absolute times are context only; compare implementations by the ratios (same process, same "
            "shapes). The Triton kernel is not timed on a CPU (it would run in the interpreter)."
        )
    return result


def ratios(rows: list[dict]) -> list[dict]:
    """Per (S, T): every implementation's time and peak memory relative to the ``torch`` fallback."""
    table = []
    for seq, guide_tokens in sorted({(row["S"], row["T"]) for row in rows}):
        same = {row["impl"]: row for row in rows if row["S"] == seq and row["T"] == guide_tokens}
        base = same["torch"]
        table.append(
            {
                "S": seq,
                "T": guide_tokens,
                "time_vs_torch": {impl: round(row["time_s"] / base["time_s"], 3) for impl, row in same.items()},
                "peak_vs_torch": {
                    impl: round(row["peak_bytes"] / max(base["peak_bytes"], 1), 2) for impl, row in same.items()
                },
            }
        )
    return table


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    guide_counts = sorted({row["T"] for row in rows})
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {guide: style for guide, style in zip(guide_counts, ("-", "--", ":"), strict=False)}
    for impl, colour in zip(("eager", "column_softmax", "torch", "triton"), ("C3", "C1", "C0", "C2"), strict=True):
        for guide in guide_counts:
            points = sorted((r["S"], r) for r in rows if r["impl"] == impl and r["T"] == guide)
            if not points:
                continue
            seqs = [s for s, _ in points]
            label = f"{impl}, T={guide}"
            axes[0].plot(
                seqs, [r["time_s"] * 1e3 for _, r in points], styles[guide], color=colour, marker="o", label=label
            )
            axes[1].plot(seqs, [r["peak_bytes"] / 2**20 for _, r in points], styles[guide], color=colour, marker="o")
    axes[0].set(xscale="log", yscale="log", xlabel="prompt tokens S", ylabel="time (ms, median)", title="time")
    axes[1].set(xscale="log", yscale="log", xlabel="prompt tokens S", ylabel="peak extra memory (MiB)", title="memory")
    axes[0].legend(fontsize=7)
    figure.suptitle(
        f"scoring, H={result['heads']}, d={result['head_dim']}, {result['dtype']}, {result['machine']['device']}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per implementation on a CPU (default 5)")
    parser.add_argument("--seq-lengths", type=_ints, default=SEQ_LENGTHS, help="prompt lengths S, e.g. 640,2880")
    parser.add_argument("--guide-tokens", type=_ints, default=GUIDE_TOKENS, help="guide tokens T, e.g. 32,128")
    parser.add_argument("--heads", type=int, default=HEADS, help=f"query (= key) heads (default {HEADS})")
    parser.add_argument("--head-dim", type=int, default=HEAD_DIM, help=f"head size (default {HEAD_DIM})")


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.repeats = min(args.repeats, 2)
    if any(guide >= seq for seq in args.seq_lengths for guide in args.guide_tokens):
        raise UsageError("every guide-token count must be smaller than every prompt length")
    out = output_dir(args.out)
    result = measure(args)
    path = write_json(result, out / f"scoring-{device_tag()}.json")
    plot(result, path.with_suffix(".png"))
    print(f"\nwrote {path} and {path.with_suffix('.png').name}")
    print(f"{'S':>5} {'T':>4}  time vs torch fallback (peak memory vs fallback)")
    for entry in result["ratios"]:
        cells = ", ".join(
            f"{impl} x{entry['time_vs_torch'][impl]} (x{entry['peak_vs_torch'][impl]})"
            for impl in entry["time_vs_torch"]
        )
        print(f"{entry['S']:>5} {entry['T']:>4}  {cells}")
    print_roofline(result)
    return 0


def print_roofline(result: dict) -> None:
    """The Triton kernel's floor on each GPU per (S, T); on a GPU run beside its measured time and that time over
    this GPU's floor (``n/a`` on a GPU without datasheet numbers here), then targets (a) and (b)."""
    device = result["machine"]["device"]
    triton = {(row["S"], row["T"]): row["time_s"] for row in result["rows"] if row["impl"] == "triton"}
    dtype = str(GPU_DTYPE).removeprefix("torch.")
    print(f"\nroofline of the Triton kernel ({dtype}, the launch configs of this device; see perf/roofline.py)")
    compared = roofline.MEASURED_HEADER if triton else ""
    print(f"{'S':>5} {'T':>4}{'MB':>9}{'GFLOP':>8}{roofline.FLOOR_HEADER}{compared}")
    for entry in result["roofline"]:
        measured = roofline.measured_cells(triton.get((entry["S"], entry["T"])), entry, device)
        cells = f"{entry['bytes'] / 1e6:>9.2f}{entry['flops'] / 1e9:>8.2f}{roofline.floor_cells(entry)}"
        print(f"{entry['S']:>5} {entry['T']:>4}{cells}{measured}")
    if triton:
        roofline.print_judged(roofline.scoring_targets(result))
    else:
        print("The floors apply to GPU rows only: no Triton row runs on a CPU, so nothing is compared.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
