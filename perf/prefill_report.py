"""Reporting a prefill benchmark result: the PNG (KV tokens per layer, ratios LightKV / stock) and the text table
printed at the end of a run.
"""

from __future__ import annotations

from pathlib import Path


def plot(result: dict, path: Path) -> None:
    """Per-layer KV tokens, stock vs LightKV, one panel per case; below, each case's prefill-time, FLOPs and KV
    ratios and the share of the LightKV prefill spent reducing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cases = result["cases"]
    names = [f"{c['model']} {c['vision_tokens']}" for c in cases]
    figure, axes = plt.subplot_mosaic(
        [names, ["ratios"] * len(names)], figsize=(4.2 * len(names) + 1, 7.5), height_ratios=[1, 1]
    )
    for name, case in zip(names, cases, strict=True):
        axis = axes[name]
        layers = range(len(case["stock"]["kv_lengths"]))
        axis.bar([i - 0.2 for i in layers], case["stock"]["kv_lengths"], width=0.4, label="stock")
        axis.bar([i + 0.2 for i in layers], case["lightkv"]["kv_lengths"], width=0.4, label="LightKV")
        axis.set(xlabel="decoder layer", ylabel="KV tokens held", title=f"{name} vision tokens")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend(loc="lower left", fontsize="small")
    axis = axes["ratios"]
    metrics = [
        ("prefill_time", "prefill time"),
        ("text_flops", "text FLOPs"),
        ("kv_bytes", "KV bytes"),
        ("reduce_share_of_prefill", "reduce share of LightKV prefill"),
    ]
    width = 0.8 / len(metrics)
    for j, (key, label) in enumerate(metrics):
        positions = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(cases))]
        values = [c["ratios"][key] for c in cases]
        bars = axis.bar(positions, values, width=width, label=label)
        axis.bar_label(bars, fmt="%.3f", fontsize="x-small")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xticks(range(len(cases)), names)
    axis.set(ylabel="LightKV / stock", title="ratios (reduce share: scoring + grouping + merging / LightKV prefill)")
    axis.legend(fontsize="small")
    text = result["text_model"]
    figure.suptitle(
        f"prefill on {result['machine']['device']}, {result['dtype']}: text model {text['num_layers']} layers x "
        f"{text['hidden_size']}, schedule {'-'.join(map(str, result['schedule']['merge_layers']))}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def table(result: dict) -> str:
    """The cases as a fixed-width text table: ratios are LightKV / stock, times medians in seconds, ``reduce`` the
    LightKV prefill's scoring + grouping + merging (and its share of that prefill)."""
    header = (
        f"{'model':<10}{'vision':>7}{'prompt':>7}{'KV':>8}{'FLOPs':>8}{'stock s':>9}{'LightKV s':>10}{'time':>8}"
        f"{'reduce ms':>10}{'share':>7}{'retention':>10}"
    )
    rows = [header]
    for c in result["cases"]:
        r = c["ratios"]
        rows.append(
            f"{c['model']:<10}{c['vision_tokens']:>7}{c['prompt_tokens']:>7}{r['kv_bytes']:>8.3f}"
            f"{r['text_flops']:>8.3f}{c['stock']['prefill_s_median']:>9.3f}{c['lightkv']['prefill_s_median']:>10.3f}"
            f"{r['prefill_time']:>8.3f}{1e3 * c['lightkv']['reduce_s_median']:>10.1f}"
            f"{r['reduce_share_of_prefill']:>7.1%}{r['vision_retention']:>10.3f}"
        )
    return "\n".join(rows)
