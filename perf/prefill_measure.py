"""Measuring one prefill case: alternating stock and LightKV prefills, analytic FLOPs per layer, and the case's
record of KV tokens, bytes, timings and ratios (see the prefill section of ``perf/README.md``).
"""

from __future__ import annotations

import statistics

from lightkv_perf.prefill_cases import Case, TextShape


def layer_flops(tokens: int, shape: TextShape) -> int:
    """Analytic FLOPs of one decoder layer on ``tokens`` tokens (a multiply-add counts 2).

    The q/k/v/o projections (``D x H*d`` twice, ``D x Hk*d`` twice) and the three SwiGLU projections (``D x I``)
    per token, plus causal attention: scores ``q.k`` and the weighted sum of values, ``H * d`` multiply-adds each
    per (query, key) pair, over ``tokens * (tokens + 1) / 2`` pairs. Norms, rotary and softmax are left out.
    """
    projections = shape.hidden_size * shape.head_dim * (2 * shape.num_heads + 2 * shape.num_kv_heads)
    mlp = 3 * shape.hidden_size * shape.intermediate_size
    pairs = tokens * (tokens + 1) // 2
    attention = 2 * shape.num_heads * shape.head_dim * pairs
    return 2 * tokens * (projections + mlp) + 2 * attention


def measure(case: Case, repeats: int) -> dict:
    """Alternating stock / LightKV prefills of ``case`` (one untimed warm-up round, then ``repeats`` timed ones).

    Returns:
        The case's record: per-layer KV tokens and bytes of each, FLOPs per layer, the timings in seconds, LightKV's
        ``reduce_s`` (scoring, grouping and merging, from the adapter's stats) and the ratios LightKV / stock.
    """
    times: dict[str, list[float]] = {"stock": [], "lightkv": []}
    reduce_seconds: list[float] = []
    for round_ in range(repeats + 1):
        stock = case.prefill(False)
        compressed = case.prefill(True)
        if round_:
            times["stock"].append(stock.seconds)
            times["lightkv"].append(compressed.seconds)
            reduce_seconds.append(compressed.stats.reduce_seconds)
        print(
            f"  {case.model} {case.vision_tokens} vision tokens, round {round_}{'' if round_ else ' (warm-up)'}: "
            f"stock {stock.seconds:.3f} s, LightKV {compressed.seconds:.3f} s",
            flush=True,
        )
    stats = compressed.stats
    medians = {name: statistics.median(values) for name, values in times.items()}
    flops = {
        "stock": [layer_flops(n, case.shape) for n in stock.kv_lengths],
        "lightkv": [layer_flops(n, case.shape) for n in compressed.kv_lengths],
    }
    retention = round(float(stats.vision_retention()[0]), 4)
    return {
        "model": case.model,
        "class": case.model_class,
        "parameters": case.parameters,
        "timed": case.timed,
        "images": case.images,
        "vision_tokens": case.vision_tokens,
        "prompt_tokens": case.prompt_tokens,
        "stock": {
            "prefill_s": times["stock"],
            "prefill_s_median": medians["stock"],
            "kv_bytes": sum(stock.kv_layer_bytes),
            "kv_lengths": stock.kv_lengths,
            "kv_layer_bytes": stock.kv_layer_bytes,
        },
        "lightkv": {
            "prefill_s": times["lightkv"],
            "prefill_s_median": medians["lightkv"],
            "kv_bytes": sum(compressed.kv_layer_bytes),
            "kv_lengths": compressed.kv_lengths,
            "kv_layer_bytes": compressed.kv_layer_bytes,
            "vision_tokens": stats.vision_tokens[:, 0].tolist(),
            "reduce_s": reduce_seconds,
            "reduce_s_median": statistics.median(reduce_seconds),
        },
        "flops_per_layer": flops,
        "ratios": {
            "prefill_time": round(medians["lightkv"] / medians["stock"], 3),
            "text_flops": round(sum(flops["lightkv"]) / sum(flops["stock"]), 3),
            "kv_bytes": round(sum(compressed.kv_layer_bytes) / sum(stock.kv_layer_bytes), 3),
            "reduce_share_of_prefill": round(statistics.median(reduce_seconds) / medians["lightkv"], 4),
            "vision_retention": retention,
        },
    }
