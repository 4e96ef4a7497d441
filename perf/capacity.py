"""SGLang capacity with layer-group KV pools: how many requests one KV memory budget holds at once.

A simulation of KV slots over SGLang's real request pool and allocators and the plugin's layer-group pools
(:mod:`lightkv_adapters.sglang.pools`): nothing is computed and no KV storage is allocated. Streams of LLaVA-NeXT-like
and mixed requests are admitted with one pool and with layer-group pools, then decoded, freed and checked for
leaks; the model, scenarios, limits and recorded numbers are in perf/README.md (SGLang capacity).

    .venv/bin/python perf/capacity.py [--budget-gib 40] [--max-new-tokens 128] [--pool-ratios a,b,c] [--out DIR]

Writes ``capacity.json`` and ``.png`` to ``--out`` (default: the results folder, ``$LIGHTKV_RESULTS_DIR`` or
``~/.cache/lightkv/results``; the committed ones with ``--out perf/results``); about 15 s on 2 CPU cores, most of it
importing SGLang.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from lightkv_adapters.sglang import cpu_env

cpu_env.install()  # stubs SGLang's CUDA-only imports: must run before sglang is imported

import sglang  # noqa: E402
import torch  # noqa: E402
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool  # noqa: E402

from lightkv_adapters.sglang.pools import (  # noqa: E402
    LayerGroupAllocator,
    LayerGroupCache,
    admits,
    check_pool_ratios,
    default_pool_ratios,
    group_demand,
    layer_groups,
    pool_sizes,
)
from lightkv_core.config import PRESET_DEPTHS, LightKVConfig, parse_values  # noqa: E402
from lightkv_core.errors import UsageError  # noqa: E402
from lightkv_core.methods import LightKV  # noqa: E402
from lightkv_core.plan import LengthPlan  # noqa: E402
from lightkv_core.run_record import RESULTS_HELP, git_commit, output_dir  # noqa: E402
from lightkv_perf.capacity_plot import plot  # noqa: E402
from lightkv_perf.capacity_requests import SHAPE, FakeReq, llava_next_request, text_request  # noqa: E402

GIB = 1 << 30
NUM_LAYERS = PRESET_DEPTHS["llava-next"]
SWEEP_GIB = (10, 20, 40, 80)
SWEEP_MAX_NEW = (0, 32, 128, 512)

STREAMS = {
    "llava-next": (llava_next_request(),),
    "mixed": (llava_next_request(), text_request()),
}


def demand(method: LightKV, req: FakeReq, max_new: int) -> list[int]:
    """Slots ``req`` needs in each layer group at admission: planned tokens + decode budget + 1 spare."""
    plan = method.plan_lengths(req.spans, len(req.full_untruncated_fill_ids))
    return [length + max_new + 1 for length in plan.lengths]


def matched_ratios(method: LightKV, cycle: Sequence[FakeReq], max_new: int) -> tuple[float, ...]:
    """Pool ratios that give each later group the stream's share of demand (decode budget included)."""
    totals = [sum(column) for column in zip(*(demand(method, req, max_new) for req in cycle), strict=True)]
    return tuple(round(total / totals[0], 4) for total in totals[1:])


def simulate(
    cycle: Sequence[FakeReq],
    stock_tokens: int,
    max_new: int,
    method: LightKV,
    ratios: Sequence[float] | None,
    verify: bool = True,
) -> dict:
    """Admit requests of the repeating ``cycle`` until one does not fit; with ``verify``, then decode them all to
    ``max_new`` tokens, free them and check the pools. ``ratios=None``: one stock pool of ``stock_tokens`` slots;
    else layer-group pools of the same memory at ``ratios``."""
    planner = lambda req, n: _plan(method, req, n)  # noqa: E731  (method.plan_lengths(req.spans, n), memoized)
    groups = layer_groups(method.reduce_layers, NUM_LAYERS)
    counts = [len(layers) for layers in groups]
    if ratios is None:
        sizes, counts = [stock_tokens], [NUM_LAYERS]
    else:
        sizes = pool_sizes(stock_tokens, counts, ratios)
    seq_lens = [len(req.full_untruncated_fill_ids) for req in cycle]
    rows = sizes[0] // (min(seq_lens) + max_new + 1) + 2
    req_pool = ReqToTokenPool(rows, max(seq_lens) + max_new + 1, "cpu", enable_memory_saver=False)
    cache = None
    if ratios is None:
        allocator = TokenToKVPoolAllocator(sizes[0], torch.float16, "cpu", None, False)
    else:
        allocator = LayerGroupAllocator(sizes[0], torch.float16, "cpu", None, False)
        later = [TokenToKVPoolAllocator(size, torch.float16, "cpu", None, False) for size in sizes[1:]]
        cache = LayerGroupCache(req_pool, later, planner, sizes[0])
        allocator.groups = cache
        req_pool.attach_aux_cache(cache)

    held: list[tuple[int, int]] = []  # (row, tokens held in group 0)
    by_kind = dict.fromkeys(sorted({req.kind for req in cycle}), 0)
    reserved = [0] * len(sizes)  # decode budget of the held requests, per group
    stream: Iterator[FakeReq] = itertools.cycle(cycle)
    while True:
        req = next(stream)
        seq_len = len(req.full_untruncated_fill_ids)
        need = [seq_len + max_new + 1]
        fits = [need[0] <= allocator.available_size() - reserved[0]]
        if cache is not None:
            need += group_demand(cache, req, max_new)
            fits += [n <= free - r for n, free, r in zip(need[1:], cache.available(), reserved[1:], strict=True)]
            assert admits(cache, need[1:], reserved[1:]) == all(fits[1:])
        if not all(fits):
            refused = {"kind": req.kind, "demand": need, "short_in_groups": [g for g, ok in enumerate(fits) if not ok]}
            break
        (row,) = req_pool.alloc_rows(1)
        slots = allocator.alloc(seq_len)
        req_pool.write((row, slice(0, seq_len)), slots.to(torch.int32))
        if cache is not None:
            cache.expect([req])
            req_pool.alloc_aux_to_lengths(
                req_pool_indices_cpu=torch.tensor([row]), target_seq_lens_cpu=torch.tensor([seq_len])
            )
            plan = planner(req, seq_len)
            for group in range(1, len(sizes)):
                cache.trim(group, row, plan.lengths[group])  # the forward's survivors: the plan is exact here
        held.append((row, seq_len))
        by_kind[req.kind] += 1
        reserved = [r + max_new for r in reserved]

    free_at_admission = _free(allocator, cache)
    result = {
        "requests": len(held),
        "by_kind": by_kind,
        "pool_ratios": None if ratios is None else list(ratios),
        "pool_slots": sizes,
        "layer_slots": sum(size * count for size, count in zip(sizes, counts, strict=True)),
        "free_after_admission": free_at_admission,
        "refused": refused,
    }
    if not verify:
        return result
    # Decode: every held request generates max_new tokens, one slot per token in every group.
    rows_held = torch.tensor([row for row, _ in held], dtype=torch.int64)
    lens = torch.tensor([n for _, n in held], dtype=torch.int64)
    for _ in range(max_new if held else 0):
        slots = allocator.alloc(len(held))
        if slots is None:
            raise RuntimeError("group 0 ran out of slots during decode: the admission under-reserved")
        req_pool.write((rows_held, lens), slots.to(torch.int32))
        lens += 1
        # raises RuntimeError if a later group runs out
        req_pool.alloc_aux_to_lengths(req_pool_indices_cpu=rows_held, target_seq_lens_cpu=lens)
    free_after_decode = _free(allocator, cache)
    # Finish: group 0's slots go back in one call, each row (and with it the row's later-group slots) as SGLang
    # frees it.
    if held:
        allocator.free(
            torch.cat([req_pool.req_to_token[row, :n] for row, n in zip(rows_held, lens, strict=True)]).long()
        )
    req_pool.free_rows(rows_held.tolist())
    problems = [] if cache is None else cache.leaks()
    if problems or _free(allocator, cache) != sizes:
        raise RuntimeError(f"slots leaked after freeing every request: {problems or _free(allocator, cache)}")
    return {**result, "free_after_decode": free_after_decode, "decode_verified": True}


_PLANS: dict[tuple[str, int], LengthPlan] = {}


def _plan(method: LightKV, req: FakeReq, seq_len: int) -> LengthPlan:
    """``method.plan_lengths(req.spans, seq_len)``, once per request kind and length (the plan is deterministic)."""
    key = (req.kind, seq_len)
    if key not in _PLANS:
        _PLANS[key] = method.plan_lengths(req.spans, seq_len)
    return _PLANS[key]


def _free(allocator: TokenToKVPoolAllocator, cache: LayerGroupCache | None) -> list[int]:
    return [allocator.available_size(), *([] if cache is None else cache.available())]


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    config = LightKVConfig.preset("llava-1.5")
    method = LightKV(config)
    groups = layer_groups(method.reduce_layers, NUM_LAYERS)
    ratios = args.pool_ratios if args.pool_ratios is not None else default_pool_ratios(method)
    check_pool_ratios(ratios, len(groups))
    token_bytes = SHAPE.kv.bytes_per_token_layer * NUM_LAYERS
    budget = int(args.budget_gib * GIB)
    stock_tokens = budget // token_bytes
    max_new = args.max_new_tokens

    scenarios = {}
    for name, cycle in STREAMS.items():
        matched = matched_ratios(method, cycle, max_new)
        scenario = scenarios[name] = {
            "stream": [req.kind for req in cycle],
            "without": simulate(cycle, stock_tokens, max_new, method, None),
            "with": simulate(cycle, stock_tokens, max_new, method, ratios),
            "with_matched_ratios": simulate(cycle, stock_tokens, max_new, method, matched),
        }
        held = {key: scenario[key]["requests"] for key in ("without", "with", "with_matched_ratios")}
        for key in ("with", "with_matched_ratios"):
            scenario[f"ratio_{key}"] = round(held[key] / held["without"], 3)
        print(
            f"{name}: {held['without']} requests without, {held['with']} with grouped pools "
            f"(x{scenario['ratio_with']}), {held['with_matched_ratios']} with ratios matched to the stream "
            f"(x{scenario['ratio_with_matched_ratios']})",
            flush=True,
        )

    main_cycle = STREAMS["llava-next"]
    main_matched = matched_ratios(method, main_cycle, max_new)
    sweep = []
    for gib in sorted({*SWEEP_GIB, args.budget_gib}):
        tokens = int(gib * GIB) // token_bytes
        sweep.append(
            {
                "budget_gib": gib,
                "stock_slots": tokens,
                "without": simulate(main_cycle, tokens, max_new, method, None, verify=False)["requests"],
                "with": simulate(main_cycle, tokens, max_new, method, ratios, verify=False)["requests"],
                "with_matched_ratios": simulate(main_cycle, tokens, max_new, method, main_matched, verify=False)[
                    "requests"
                ],
            }
        )

    decode_sweep = []
    for new_tokens in sorted({*SWEEP_MAX_NEW, max_new}):
        point = {"max_new_tokens": new_tokens}
        for key, pool_ratios in (
            ("without", None),
            ("with", ratios),
            ("with_matched_ratios", matched_ratios(method, main_cycle, new_tokens)),
        ):
            point[key] = simulate(main_cycle, stock_tokens, new_tokens, method, pool_ratios, verify=False)["requests"]
        point["ratio_with"] = round(point["with"] / point["without"], 3)
        point["ratio_with_matched_ratios"] = round(point["with_matched_ratios"] / point["without"], 3)
        decode_sweep.append(point)

    main = scenarios["llava-next"]
    per_request = {}
    for req in (llava_next_request(), text_request()):
        plan = method.plan_lengths(req.spans, len(req.full_untruncated_fill_ids))
        per_request[req.kind] = {
            "prompt_tokens": len(req.full_untruncated_fill_ids),
            "vision_tokens": sum(span.length for span in req.spans),
            "tokens_per_group": list(plan.lengths),
            "plan_exact": plan.exact,
            "demand_per_group": demand(method, req, max_new),
        }
    return {
        "benchmark": "sglang-capacity",
        "requests_without": main["without"]["requests"],
        "requests_with": main["with"]["requests"],
        "ratio": main["ratio_with"],
        "settings": {
            "budget_bytes": budget,
            "budget_gib": args.budget_gib,
            "model_shape": {
                "layers": NUM_LAYERS,
                "kv_heads": SHAPE.kv.kv_heads,
                "head_dim": SHAPE.kv.head_dim,
                "bytes_per_value": SHAPE.kv.bytes_per_value,
                "kv_bytes_per_token_all_layers": token_bytes,
            },
            "schedule": {
                "preset": "llava-1.5",
                "merge_layers": config.merge_layers,
                "merge_windows": config.merge_windows,
                "merge_ratios": config.merge_ratios,
                "layout": config.layout,
            },
            "layer_groups": [[layers[0], layers[-1]] for layers in groups],
            "pool_ratios": list(ratios),
            "pool_ratios_source": "--pool-ratios" if args.pool_ratios is not None else "default_pool_ratios",
            "stock_slots": stock_tokens,
            "stock_layer_slots": stock_tokens * NUM_LAYERS,
            "pool_slots_per_group": main["with"]["pool_slots"],
            "layer_slots_grouped": main["with"]["layer_slots"],
            "matched_pool_ratios": {name: s["with_matched_ratios"]["pool_ratios"] for name, s in scenarios.items()},
            "max_new_tokens": max_new,
            "per_request": per_request,
        },
        "scenarios": scenarios,
        "budget_sweep": sweep,
        "max_new_tokens_sweep": decode_sweep,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "device": "CPU (slots only, no KV storage)",
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "sglang": sglang.__version__,
            "commit": git_commit(),
        },
        "seconds": round(time.perf_counter() - started, 2),
    }


def _pool_ratios(text: str) -> tuple[float, ...]:
    try:
        return parse_values(text, float, "--pool-ratios")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-gib", type=float, default=40.0, help="KV cache memory in GiB (default 40)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="decode slots each request reserves (default 128)"
    )
    parser.add_argument(
        "--pool-ratios",
        type=_pool_ratios,
        default=None,
        help="slots of layer groups 1-3 per slot of group 0, e.g. 0.52,0.28,0.15 (default: the plugin's default)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"folder for capacity.json and .png (default {RESULTS_HELP})"
    )
    args = parser.parse_args(argv)
    if not args.budget_gib > 0 or args.max_new_tokens < 0:  # not > 0: also refuses nan
        parser.error("--budget-gib must be > 0 and --max-new-tokens >= 0")
    if args.pool_ratios is not None:
        try:
            check_pool_ratios(args.pool_ratios, len(LightKVConfig.preset("llava-1.5").merge_layers) + 1)
        except ValueError as error:
            parser.error(f"--pool-ratios: {error}")
    try:
        out = output_dir(args.out)
    except UsageError as error:
        parser.error(str(error))
    result = run(args)
    path = out / "capacity.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, path.with_suffix(".png"))
    print(
        f"wrote {path}: {result['requests_with']} requests with layer-group pools vs {result['requests_without']} "
        f"without (x{result['ratio']}) in {result['settings']['budget_gib']:g} GiB of KV, pool slots "
        f"{result['settings']['pool_slots_per_group']} vs {result['settings']['stock_slots']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
