"""SGLang capacity with layer-group KV slots: how many requests one KV memory budget holds at once.

A simulation of KV slots over SGLang's real request pool and allocators and the plugin's layer-group pools
(:mod:`lightkv_adapters.sglang.pools`, :mod:`lightkv_adapters.sglang.arena`): nothing is computed and no KV storage
is allocated. Three ways to hold the slots are compared on the same memory: one pool (stock SGLang), fixed pools per
layer group at the plugin's former default ratios, and the groups drawing pages from one shared arena (the plugin's
default). Mixes of LLaVA-NeXT-like and text-only requests are admitted until full, decoded, freed and checked for
leaks; a trace shifting from images to text is served step by step. Both again with SGLang's radix cache on and a
system prompt every request shares (one pool reuses it for every request, the layer groups for text-only ones). The
model, mixes, limits and recorded numbers are in perf/README.md (SGLang capacity).

    .venv/bin/python perf/capacity.py [--budget-gib 40] [--max-new-tokens 128] [--trace-requests 240]
        [--system-prompt-tokens 200] [--out DIR]

Writes ``capacity.json`` and ``.png`` to ``--out`` (default: the results folder, ``$LIGHTKV_RESULTS_DIR`` or
``~/.cache/lightkv/results``; the committed ones with ``--out perf/results``); about 2.5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from lightkv_adapters.sglang import cpu_env

cpu_env.install()  # stubs SGLang's CUDA-only imports: must run before sglang is imported

import sglang  # noqa: E402
import torch  # noqa: E402

from lightkv_adapters.sglang.arena import page_rows  # noqa: E402
from lightkv_adapters.sglang.pools import layer_groups  # noqa: E402
from lightkv_core.config import PRESET_DEPTHS, LightKVConfig  # noqa: E402
from lightkv_core.errors import UsageError  # noqa: E402
from lightkv_core.methods import LightKV  # noqa: E402
from lightkv_core.run_record import RESULTS_HELP, git_commit, output_dir  # noqa: E402
from lightkv_perf.capacity_plot import plot  # noqa: E402
from lightkv_perf.capacity_requests import SHAPE, llava_next_request, text_request, with_system_prompt  # noqa: E402
from lightkv_perf.capacity_sim import LAYOUTS, SlotSim, fill, serve, shifting_trace, static_default_ratios  # noqa: E402

GIB = 1 << 30
NUM_LAYERS = PRESET_DEPTHS["llava-next"]
SWEEP_GIB = (10, 20, 40, 80)
SWEEP_MAX_NEW = (0, 32, 128, 512)

#: The request mixes admitted until full: each repeats its cycle of requests.
MIXES = {
    "vision": (llava_next_request(),),
    "text": (text_request(),),
    "50/50": (llava_next_request(), text_request()),
}


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    config = LightKVConfig.preset("llava-1.5")
    method = LightKV(config)
    groups = layer_groups(method.reduce_layers, NUM_LAYERS)
    counts = [len(layers) for layers in groups]
    ratios = static_default_ratios(method)
    token_bytes = SHAPE.kv.bytes_per_token_layer * NUM_LAYERS
    budget = int(args.budget_gib * GIB)
    stock_tokens = budget // token_bytes
    max_new = args.max_new_tokens

    def sim(layout: str, tokens: int = stock_tokens, cached_prefix: int = 0) -> SlotSim:
        return SlotSim(layout, tokens, method, NUM_LAYERS, ratios, cached_prefix=cached_prefix)

    mixes = {}
    for name, cycle in MIXES.items():
        mix = mixes[name] = {"cycle": [req.kind for req in cycle]}
        for layout in LAYOUTS:
            mix[layout] = fill(sim(layout), cycle, max_new)
        for layout in LAYOUTS[1:]:
            mix[f"ratio_{layout}"] = round(mix[layout]["requests"] / mix["one"]["requests"], 3)
        print(
            f"{name}: " + ", ".join(f"{layout} {mix[layout]['requests']}" for layout in LAYOUTS) + " requests held",
            flush=True,
        )

    trace = shifting_trace(args.trace_requests)
    served = {}
    for layout in LAYOUTS:
        served[layout] = serve(sim(layout), trace, max_new)
        print(
            f"shifting trace ({len(trace)} requests), {layout}: {served[layout]['mean_held']} held on average, "
            f"{served[layout]['steps']} decode steps",
            flush=True,
        )

    system = args.system_prompt_tokens
    radix = {"system_prompt_tokens": system}
    for name, cycle in MIXES.items():
        prompted = tuple(with_system_prompt(req, system) for req in cycle)
        radix[name] = {
            layout: fill(sim(layout, cached_prefix=system), prompted, max_new)["requests"] for layout in LAYOUTS
        }
        print(f"radix cache on, {name}: " + ", ".join(f"{k} {v}" for k, v in radix[name].items()), flush=True)
    prompted_trace = [with_system_prompt(req, system) for req in trace]
    radix["shifting trace"] = {
        layout: serve(sim(layout, cached_prefix=system), prompted_trace, max_new) for layout in LAYOUTS
    }
    print(
        "radix cache on, shifting trace: "
        + ", ".join(f"{k} {v['mean_held']} held, {v['steps']} steps" for k, v in radix["shifting trace"].items()),
        flush=True,
    )

    budget_sweep = []
    for gib in sorted({*SWEEP_GIB, args.budget_gib}):
        tokens = int(gib * GIB) // token_bytes
        point = {"budget_gib": gib, "stock_slots": tokens}
        for name, cycle in MIXES.items():
            point[name] = {
                layout: fill(sim(layout, tokens), cycle, max_new, verify=False)["requests"] for layout in LAYOUTS
            }
        budget_sweep.append(point)
    decode_sweep = []
    for new_tokens in sorted({*SWEEP_MAX_NEW, max_new}):
        point = {"max_new_tokens": new_tokens}
        for name, cycle in MIXES.items():
            point[name] = {layout: fill(sim(layout), cycle, new_tokens, verify=False)["requests"] for layout in LAYOUTS}
        decode_sweep.append(point)

    per_request = {}
    for req in (llava_next_request(), text_request()):
        plan = method.plan_lengths(req.spans, len(req.full_untruncated_fill_ids))
        per_request[req.kind] = {
            "prompt_tokens": len(req.full_untruncated_fill_ids),
            "vision_tokens": sum(span.length for span in req.spans),
            "tokens_per_group": list(plan.lengths),
            "plan_exact": plan.exact,
            "demand_per_group": [length + max_new + 1 for length in plan.lengths],
        }
    rows = page_rows(counts)
    shared = mixes["vision"]["shared"]
    return {
        "benchmark": "sglang-capacity",
        "requests": {name: {layout: mixes[name][layout]["requests"] for layout in LAYOUTS} for name in MIXES}
        | {"shifting trace (mean held)": {layout: served[layout]["mean_held"] for layout in LAYOUTS}},
        "requests_with_radix_cache": {name: radix[name] for name in MIXES}
        | {"shifting trace (mean held)": {layout: radix["shifting trace"][layout]["mean_held"] for layout in LAYOUTS}},
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
            "stock_slots": stock_tokens,
            "static_pool_ratios": list(ratios),
            "static_pool_slots": mixes["vision"]["static"]["pool_slots"],
            "arena": {
                "pages": shared["pages"],
                "rows_per_page": rows,
                "tokens_per_page": [rows // count for count in counts],
            },
            "max_new_tokens": max_new,
            "prefill": "an image request is admitted whole (one chunk); text-only requests hold the same slots "
            "whether chunked or not",
            "prefix_cache": "off in 'requests' (every request holds its own slots); on in "
            "'requests_with_radix_cache': every prompt starts with the same cached system prompt of "
            f"{system} tokens, which one pool lends to every request and the layer groups to text-only requests "
            "(prompts with images stay out of the tree); the cache holds nothing else",
            "per_request": per_request,
        },
        "mixes": mixes,
        "shifting_trace": {"requests": [req.kind for req in trace], **served},
        "radix_cache": radix,
        "budget_sweep": budget_sweep,
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-gib", type=float, default=40.0, help="KV cache memory in GiB (default 40)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=128, help="decode slots each request reserves (default 128)"
    )
    parser.add_argument("--trace-requests", type=int, default=240, help="requests of the shifting trace (default 240)")
    parser.add_argument(
        "--system-prompt-tokens",
        type=int,
        default=200,
        help="tokens of the system prompt every request shares in the radix-cache runs (default 200)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"folder for capacity.json and .png (default {RESULTS_HELP})"
    )
    args = parser.parse_args(argv)
    # not > 0: also refuses nan
    if not args.budget_gib > 0 or args.max_new_tokens < 0 or args.trace_requests < 2 or args.system_prompt_tokens < 0:
        parser.error(
            "--budget-gib must be > 0, --max-new-tokens >= 0, --trace-requests >= 2 and --system-prompt-tokens >= 0"
        )
    try:
        out = output_dir(args.out)
    except UsageError as error:
        parser.error(str(error))
    result = run(args)
    path = out / "capacity.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, path.with_suffix(".png"))
    print(
        f"wrote {path}: requests held per mix and layout {result['requests']}; with the radix cache on "
        f"{result['requests_with_radix_cache']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
