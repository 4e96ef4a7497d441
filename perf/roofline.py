"""Roofline floors of the Triton kernels on an H100 SXM and an H200, and the project's three speed targets.

A kernel's floor on a GPU is ``max(bytes / HBM bandwidth, FLOPs / peak rate)``: no launch moving ``bytes`` and doing
``FLOPs`` runs faster. Both counts come from the problem shape and the launch config, never from a measurement.

The model, for every kernel below:
- **Bytes** are HBM traffic, counted as a lower bound: every distinct byte one launch reads or writes, once. A
  re-read inside one launch (a tile of keys that many programs load, queries streamed once per tile of guide tokens)
  is taken to hit L2. What one launch writes and the next reads (partial results) crosses HBM both ways, so the
  number of launches and the tiles that size the partials are in the count. The wrappers' host-side preparations
  (index casts, building the tile tables, a ``bool`` mask cast to ``int8``: a few bytes per token) are left out.
- **FLOPs** count a multiply-add as 2, on the unit that does it: tensor cores for ``tl.dot`` on fp16/bf16 tiles
  (dense rate), plain fp32 cores for ``tl.dot`` on fp32 tiles (``input_precision="ieee"``) and for elementwise math.
  ``exp``/``log`` (special-function units) are left out.

    python -m lightkv_perf.roofline                        # floors of scoring and attention_stats for one prompt
    python -m lightkv_perf.roofline --targets perf/results/scoring-h100.json perf/results/prefill-h100.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lightkv_core.kernels.tuning import bucket, dtype_name, launch_config


@dataclass(frozen=True)
class Gpu:
    """A GPU's datasheet ceilings: HBM bandwidth in bytes/s, dense fp16/bf16 tensor-core and plain fp32 FLOP/s."""

    name: str
    hbm_bytes_per_s: float
    tensor_flops_per_s: float
    fp32_flops_per_s: float


# NVIDIA datasheets. H100 Tensor Core GPU datasheet, "H100 SXM" column: GPU memory bandwidth 3.35 TB/s; FP16 and
# BF16 Tensor Core 1,979 TFLOPS *with sparsity*, so 989.4 dense (the figure of NVIDIA's H100 whitepaper for H100
# SXM5); FP32 67 TFLOPS (66.9 in the whitepaper). H200 Tensor Core GPU datasheet, "H200 SXM" column: 4.8 TB/s of
# HBM3e, the same Hopper compute (1,979 sparse FP16/BF16 TFLOPS, 67 FP32). Decimal units: 1 TB/s = 1e12 bytes/s.
GPUS = {
    "h100-sxm": Gpu("H100 SXM", 3.35e12, 989.4e12, 66.9e12),
    "h200": Gpu("H200", 4.8e12, 989.4e12, 66.9e12),
}

TARGET_SEQ = 2880  # the scoring targets are judged at LLaVA-NeXT's 2,880 vision tokens (five 24x24 images)
WITHIN_FLOOR = 2.0  # (a) the scoring kernel within 2x of its bandwidth floor
OVER_COLUMN_SOFTMAX = 1.5  # (b) at least 1.5x faster than a plain column softmax
PREFILL_SHARE = 0.01  # (c) scoring + grouping + merging at most 1% of a 7B prefill


def gpu_of(device_name: str) -> str | None:
    """The :data:`GPUS` key of a CUDA device name (``"NVIDIA H100 80GB HBM3"`` -> ``"h100-sxm"``), or ``None`` for
    any other device (an H100 PCIe or NVL, a GH200: other bandwidths, so no datasheet floor here)."""
    name = device_name.lower()
    if "nvl" in name:
        return None
    if re.search(r"\bh200\b", name):
        return "h200"
    if re.search(r"\bh100\b", name) and ("hbm3" in name or "sxm" in name):
        return "h100-sxm"
    return None


@dataclass(frozen=True)
class Cost:
    """What one call of a kernel must move and compute: ``bytes`` of HBM traffic, ``flops`` on ``unit``
    (``"tensor"`` or ``"fp32"``)."""

    bytes: int
    flops: int
    unit: str

    def bandwidth_s(self, gpu: Gpu) -> float:
        """Seconds to move the bytes at the datasheet HBM bandwidth."""
        return self.bytes / gpu.hbm_bytes_per_s

    def compute_s(self, gpu: Gpu) -> float:
        """Seconds to do the FLOPs at the datasheet peak of the unit."""
        return self.flops / (gpu.tensor_flops_per_s if self.unit == "tensor" else gpu.fp32_flops_per_s)

    def floor_s(self, gpu: Gpu) -> float:
        return max(self.bandwidth_s(gpu), self.compute_s(gpu))

    def record(self) -> dict:
        """The JSON record: bytes, FLOPs, unit, and per :data:`GPUS` key the two times and the floor (seconds)."""
        floors = {
            key: {"bandwidth_s": self.bandwidth_s(gpu), "compute_s": self.compute_s(gpu), "floor_s": self.floor_s(gpu)}
            for key, gpu in GPUS.items()
        }
        return {"bytes": self.bytes, "flops": self.flops, "flop_unit": self.unit, "floors": floors}


def _unit(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "tensor"


def scoring_cost(
    batch: int,
    heads: int,
    kv_heads: int,
    seq: int,
    guides: int,
    head_dim: int,
    dtype: torch.dtype,
    split_s: int,
    heads_per_program: int,
) -> Cost:
    """``cross_attention_scores`` on Triton: ``q (B, H, S, d)``, ``k (B, Hk, S, d)`` in ``dtype``, ``T`` guides.

    Two launches, each reading all queries, the guide keys (once per key head: GQA heads share them through L2), the
    ``int8`` mask, the ``int32`` guide index and counts. Pass 1 writes ``B * H * ceil(S / SPLIT_S) * T`` float32
    log-sum-exp partials that pass 2 reads; pass 2 writes ``B * ceil(H / HEADS_PER_PROGRAM) * S`` float32 partial
    row sums, which a sum over the head blocks reads and turns into the ``(B, S)`` output (no sum for one block).
    FLOPs: the ``q . k`` logits of every (head, query, guide) in each pass, ``2 * 2 * B * H * S * T * d``.
    """
    element = dtype.itemsize
    per_pass = (
        batch * heads * seq * head_dim * element  # queries
        + batch * kv_heads * guides * head_dim * element  # guide keys
        + batch * (seq + 4 * guides + 4)  # mask, guide index, count
    )
    lse_partials = batch * heads * math.ceil(seq / split_s) * guides * 4
    head_blocks = math.ceil(heads / heads_per_program)
    row_partials = batch * head_blocks * seq * 4
    head_sum = row_partials + batch * seq * 4 if head_blocks > 1 else 0
    moved = 2 * per_pass + 2 * lse_partials + row_partials + head_sum
    return Cost(moved, 2 * 2 * batch * heads * seq * guides * head_dim, _unit(dtype))


def window_match_cost(
    a_counts: Sequence[int], b_counts: Sequence[int], hidden: int, dtype: torch.dtype, block_a: int, block_b: int
) -> Cost:
    """``window_best_match`` on Triton: per window ``w``, ``a_counts[w]`` A tokens against ``b_counts[w]`` B tokens,
    rows of ``hidden`` features in ``dtype``.

    Bytes: the feature rows of every window with both A and B tokens, once; the int64 row lists (A rows always, B
    rows where the window has A tokens), both offset lists, the tile tables (window and start, int64 per program of
    ``BLOCK_A`` A tokens), and the outputs ``best`` (int64) and ``sim`` (float32) of every A token. FLOPs (fp32
    cores, elementwise products): per window ``2 * D * (a * b + a * ceil(b / BLOCK_B) + b * ceil(a / BLOCK_A))``,
    the dot products plus the squared norms, which each program recomputes per tile of the other side.
    """
    element = dtype.itemsize
    features = index = flops = tiles = 0
    for a, b in zip(a_counts, b_counts, strict=True):
        tiles += math.ceil(a / block_a)
        if a and b:
            features += (a + b) * hidden * element
            index += 8 * b
            flops += 2 * hidden * (a * b + a * math.ceil(b / block_b) + b * math.ceil(a / block_a))
    num_a = sum(a_counts)
    index += 8 * num_a + 2 * 8 * (len(a_counts) + 1) + 2 * 8 * tiles
    return Cost(features + index + num_a * (8 + 4), flops, "fp32")


def merge_compact_cost(
    out_rows: int, real_rows: int, receivers: int, sources: int, hidden: int, dtype: torch.dtype
) -> Cost:
    """``merge_compact`` on Triton: ``out_rows`` output rows of ``hidden`` features in ``dtype``, ``real_rows`` of
    them real (``out_rows >= 0``), ``receivers`` of those with merged rows, ``sources`` merged rows in all.

    Bytes: every real target row and every source row read once, every output row written, the float32 weights of
    receivers and sources, and the int64 lists ``out_rows``, ``src_offsets`` and ``src_rows`` (the tile ``BLOCK_D``
    only decides how many programs share a row's scalars, through L1/L2). FLOPs (fp32): a multiply-add per feature
    of every receiver and source row, and a division per feature of every receiver.
    """
    row = hidden * dtype.itemsize
    moved = (real_rows + sources + out_rows) * row + 4 * (receivers + sources) + 8 * (2 * out_rows + 1 + sources)
    return Cost(moved, 2 * hidden * (receivers + sources) + hidden * receivers, "fp32")


def attention_stats_cost(
    batch: int,
    heads: int,
    kv_heads: int,
    seq: int,
    query_rows: Sequence[int],
    columns: int,
    head_dim: int,
    dtype: torch.dtype,
    causal: bool,
) -> Cost:
    """``attention_statistics`` on Triton (``heads="per_head"``): the query rows at positions ``query_rows`` (the same
    in every sample), ``columns`` key columns, ``q (B, H, S, d)`` and ``k (B, Hk, S, d)`` in ``dtype``.

    Pass 1 reads the selected queries, every key up to the last query row (causal) or all ``S``, the ``int8`` mask of
    those keys and the ``int32`` query index, and writes a float32 log-sum-exp per (head, query). Pass 2 reads the
    queries again, the selected key columns with their ``int32`` index and mask entries, the query index and the
    log-sum-exps, and writes the ``(B, H, C)`` float32 output. FLOPs: pass 1 the ``q . k`` of every allowed (query,
    key) pair, pass 2 of every (query, column) pair (masked after the product), ``2 * d`` each, per head.
    """
    element = dtype.itemsize
    count = len(query_rows)
    keys = min(seq, max(query_rows) + 1) if causal and query_rows else seq
    queries = batch * heads * count * head_dim * element
    lse = batch * heads * count * 4
    first = queries + batch * kv_heads * keys * head_dim * element + batch * (keys + 4 * count) + lse
    second = queries + batch * kv_heads * columns * head_dim * element + batch * (5 * columns + 4 * count) + lse
    second += batch * heads * columns * 4
    pairs = sum(min(seq, row + 1) for row in query_rows) if causal else count * seq
    flops = 2 * batch * heads * head_dim * (pairs + count * columns)
    return Cost(first + second, flops, _unit(dtype))


def scoring_roofline(
    seq: int, guides: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> dict:
    """The roofline record of one scoring call (batch 1) with the configs it launches with on ``device`` (tuned, or
    the defaults; on a CPU the defaults, as no GPU tuned them): :meth:`Cost.record` plus ``config``."""
    dims = {"S": bucket(seq), "T": bucket(guides), "H": heads, "d": head_dim, "dtype": dtype_name(dtype)}
    lse = launch_config("scoring.column_lse", device, **dims)
    rows = launch_config("scoring.row_sum", device, **dims)
    cost = scoring_cost(1, heads, kv_heads, seq, guides, head_dim, dtype, lse["SPLIT_S"], rows["HEADS_PER_PROGRAM"])
    return {**cost.record(), "config": {"scoring.column_lse": lse, "scoring.row_sum": rows}}


def floor_cells(record: dict) -> str:
    """``record``'s floor on each GPU in microseconds with what bounds it, 14 characters each: ``"     14.1  mem"``."""
    cells = []
    for floor in record["floors"].values():
        bound = "mem" if floor["bandwidth_s"] >= floor["compute_s"] else "math"
        cells.append(f"{floor['floor_s'] * 1e6:>9.1f} {bound:>4}")
    return "".join(cells)


def over_floor(time_s: float, record: dict, device_name: str) -> float | None:
    """``time_s`` over ``record``'s floor on the GPU called ``device_name``; ``None`` if it is not one of
    :data:`GPUS`."""
    key = gpu_of(device_name)
    return None if key is None else time_s / record["floors"][key]["floor_s"]


FLOOR_HEADER = "".join(f"{gpu.name + ' us':>14}" for gpu in GPUS.values())
MEASURED_HEADER = f"{'triton us':>11}{'x floor':>9}"


def measured_cells(time_s: float | None, record: dict, device_name: str) -> str:
    """The cells under :data:`MEASURED_HEADER`: the Triton time in microseconds and that time over this GPU's floor
    (``n/a`` on a GPU without datasheet numbers here); empty when there is no Triton time."""
    if time_s is None:
        return ""
    ratio = over_floor(time_s, record, device_name)
    return f"{time_s * 1e6:>11.1f}{'n/a' if ratio is None else f'{ratio:.2f}':>9}"


# ----------------------------------------------------------------------------------------------
# The speed targets, judged from the JSON results of a GPU run


@dataclass(frozen=True)
class Target:
    """One speed target: ``status`` is ``"PASS"``, ``"FAIL"`` or ``"N/A"`` (the results cannot judge it)."""

    name: str
    status: str
    detail: str


SCORING_TARGETS = (
    f"(a) scoring within {WITHIN_FLOOR:g}x of its bandwidth floor",
    f"(b) scoring >= {OVER_COLUMN_SOFTMAX:g}x faster than a plain column softmax",
)
PREFILL_TARGET = f"(c) score + group + merge <= {PREFILL_SHARE:.0%} of a 7B prefill"


def _judged(name: str, checks: list[tuple[bool, str]], missing: str) -> Target:
    if not checks:
        return Target(name, "N/A", missing)
    return Target(name, "PASS" if all(ok for ok, _ in checks) else "FAIL", "; ".join(text for _, text in checks))


def scoring_targets(result: dict) -> list[Target]:
    """Targets (a) and (b) from a ``lightkv bench scoring`` result, at ``S = TARGET_SEQ`` for every ``T`` run.

    (a): the Triton time over the bandwidth floor (``bytes`` of its roofline record over the HBM bandwidth of the GPU
    it ran on, which must be one of :data:`GPUS`). (b): ``column_softmax``'s time over the Triton time.
    """
    device = result["machine"]["device"]
    key = gpu_of(device)
    rows = {(row["T"], row["impl"]): row for row in result["rows"] if row["S"] == TARGET_SEQ}
    roofline = {entry["T"]: entry for entry in result.get("roofline", []) if entry["S"] == TARGET_SEQ}
    floor_checks, speed_checks = [], []
    for guides in sorted({t for t, impl in rows if impl == "triton"}):
        triton = rows[(guides, "triton")]["time_s"]
        if key is not None and guides in roofline:
            floor = roofline[guides]["floors"][key]["bandwidth_s"]
            text = f"T={guides}: {triton * 1e6:.1f} us = {triton / floor:.2f}x the {GPUS[key].name} bandwidth floor"
            floor_checks.append((triton <= WITHIN_FLOOR * floor, f"{text} {floor * 1e6:.1f} us"))
        if (guides, "column_softmax") in rows:
            speedup = rows[(guides, "column_softmax")]["time_s"] / triton
            speed_checks.append((speedup >= OVER_COLUMN_SOFTMAX, f"T={guides}: {speedup:.2f}x"))
    no_rows = f"no Triton row at S={TARGET_SEQ} on {device} (needs a GPU run)"
    no_floor = no_rows if not speed_checks else f"no datasheet floor for {device} (H100 SXM and H200 only)"
    return [_judged(SCORING_TARGETS[0], floor_checks, no_floor), _judged(SCORING_TARGETS[1], speed_checks, no_rows)]


def prefill_target(result: dict) -> Target:
    """Target (c) from a ``lightkv bench prefill`` result: in every case of a 7B-shaped GPU run, LightKV's reduce time
    (scoring, grouping, merging, host-side planning included) over the whole LightKV prefill (medians)."""
    where = result["machine"]["device"]
    if result.get("size") != "7b" or where.startswith("CPU"):
        return Target(
            PREFILL_TARGET, "N/A", f"needs a 7b GPU run (--size 7b), got size {result.get('size')!r} on {where}"
        )
    checks = []
    for case in result["cases"]:
        share = case["lightkv"]["reduce_s_median"] / case["lightkv"]["prefill_s_median"]
        checks.append((share <= PREFILL_SHARE, f"{case['model']} {case['vision_tokens']} vision: {share:.2%}"))
    return _judged(PREFILL_TARGET, checks, "no prefill case")


def targets(results: Sequence[dict]) -> list[Target]:
    """The three targets from benchmark results (any order; ``kernels`` results are ignored): ``N/A`` for the ones
    whose benchmark is missing."""
    by_name = {result["benchmark"]: result for result in results}
    if "scoring" in by_name:
        judged = scoring_targets(by_name["scoring"])
    else:
        judged = [Target(name, "N/A", "no scoring result") for name in SCORING_TARGETS]
    if "prefill" in by_name:
        return [*judged, prefill_target(by_name["prefill"])]
    return [*judged, Target(PREFILL_TARGET, "N/A", "no prefill result")]


def as_dicts(judged: Sequence[Target]) -> list[dict]:
    """``judged`` as JSON records."""
    return [asdict(target) for target in judged]


# ----------------------------------------------------------------------------------------------
# The command line


def print_prompt_floors(args: argparse.Namespace) -> None:
    """Floors of the scoring kernel and of the baselines' attention statistics (causal, every vision token a column)
    for one prompt, batch 1, whose last ``args.guides`` tokens are text (the guides, as ``lightkv autotune`` has it)."""
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    shape = dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, dtype=dtype)
    seq, guides, vision = args.seq, args.guides, args.vision
    lines = [("scoring", f"T={guides}", scoring_roofline(seq, guides, device=device, **shape))]
    query_sets = {"last token": [seq - 1], f"{guides} guides": range(seq - guides, seq), "every token": range(seq)}
    for label, rows in query_sets.items():
        cost = attention_stats_cost(1, seq=seq, query_rows=list(rows), columns=vision, causal=True, **shape)
        lines.append(("attention_stats", f"{label} x {vision} vision", cost.record()))
    print(
        f"S={seq}, H={args.heads}/{args.kv_heads}, d={args.head_dim}, {args.dtype}; "
        "floor = max(bytes / HBM bandwidth, FLOPs / peak), NVIDIA datasheet numbers"
    )
    print(f"{'kernel':<16}{'shape':<30}{'MB':>9}{'GFLOP':>8}{FLOOR_HEADER}")
    for kernel, label, record in lines:
        print(f"{kernel:<16}{label:<30}{record['bytes'] / 1e6:>9.2f}{record['flops'] / 1e9:>8.2f}{floor_cells(record)}")


def print_judged(judged: Sequence[Target]) -> None:
    """One line per target: status, name, detail."""
    for target in judged:
        print(f"{target.status:<5} {target.name}: {target.detail}")


def print_targets(paths: Sequence[Path]) -> int:
    """Print the three targets judged from the results at ``paths``; 0 if all pass, 1 otherwise."""
    judged = targets([json.loads(path.read_text()) for path in paths])
    print_judged(judged)
    return 0 if all(target.status == "PASS" for target in judged) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightkv_perf.roofline", description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", type=Path, metavar="JSON", help="judge the targets from these results")
    parser.add_argument("--seq", type=int, default=2980, help="prompt tokens S (default 2980, LLaVA-NeXT's)")
    parser.add_argument("--vision", type=int, default=2880, help="vision tokens among them (default 2880)")
    parser.add_argument("--guides", type=int, default=100, help="guide tokens T of the scoring (default 100)")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    args = parser.parse_args(argv)
    if args.targets:
        return print_targets(args.targets)
    print_prompt_floors(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
