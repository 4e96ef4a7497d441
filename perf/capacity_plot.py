"""The figure of the capacity benchmark (:mod:`lightkv_perf.capacity`): requests held against the KV budget and
the decode budget, and the slots of each layer group."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def plot(result: dict, path: Path) -> None:
    """Draws ``result`` (what :func:`lightkv_perf.capacity.run` returns) to the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = result["settings"]
    figure, (by_budget, by_decode, slots) = plt.subplots(1, 3, figsize=(17, 4.8))
    lines = (
        ("without", "one pool (stock)", "o-"),
        ("with", f"layer-group pools, ratios {_ratios(settings['pool_ratios'])}", "s-"),
        ("with_matched_ratios", "layer-group pools, ratios matched to the demand", "^--"),
    )
    for axes, sweep, x_key, xlabel, title in (
        (
            by_budget,
            result["budget_sweep"],
            "budget_gib",
            "KV cache budget (GiB)",
            f"LLaVA-NeXT-like requests, max_new_tokens {settings['max_new_tokens']}",
        ),
        (
            by_decode,
            result["max_new_tokens_sweep"],
            "max_new_tokens",
            "decode slots reserved per request (max_new_tokens)",
            f"LLaVA-NeXT-like requests, {settings['budget_gib']:g} GiB",
        ),
    ):
        xs = [point[x_key] for point in sweep]
        for key, label, style in lines:
            axes.plot(xs, [point[key] for point in sweep], style, label=label)
        axes.set(xlabel=xlabel, ylabel="requests held at once", title=title, xticks=xs)
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
    by_budget.legend(loc="upper left", fontsize=8)

    groups = settings["layer_groups"]
    labels = [f"layers {first}-{last}" for first, last in groups]
    positions = range(len(groups))
    grouped = settings["pool_slots_per_group"]
    demand = settings["per_request"]["llava-next"]["demand_per_group"]
    slots.bar([i - 0.2 for i in positions], [settings["stock_slots"]] * len(groups), width=0.4, label="one pool")
    bars = slots.bar([i + 0.2 for i in positions], grouped, width=0.4, label="layer-group pools")
    for bar, size, need in zip(bars, grouped, demand, strict=True):
        slots.annotate(
            f"~{size // need} req",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=9,
            color="C1",
        )
    slots.text(
        -0.4,
        settings["stock_slots"] * 1.01,
        f"~{settings['stock_slots'] // demand[0]} req",
        va="bottom",
        fontsize=9,
        color="C0",
    )
    slots.set_xticks(list(positions), labels)
    slots.set(
        ylabel="KV slots (tokens) per layer",
        title=f"KV slots per layer group, {settings['budget_gib']:g} GiB",
        xlabel="~N req: LLaVA-NeXT-like requests the group alone fits",
        ylim=(0, max(grouped[0], settings["stock_slots"]) * 1.12),
    )
    slots.legend(loc="upper right", fontsize=8)
    figure.suptitle(
        f"LLaVA-NeXT-7B KV shape, LightKV 12-18-24 / 4-2-1 / 0.5, max_new_tokens {settings['max_new_tokens']}: "
        f"{result['requests_with']} vs {result['requests_without']} requests (x{result['ratio']})"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _ratios(ratios: Sequence[float]) -> str:
    return "/".join(f"{ratio:.3f}" for ratio in ratios)
