"""The figure of the capacity benchmark (:mod:`lightkv_perf.capacity`): requests held per request mix and slot
layout, requests held along the shifting trace, and the gain against the decode budget."""

from __future__ import annotations

from pathlib import Path

#: Legend of each slot layout.
LABELS = {
    "one": "one pool (stock)",
    "static": "fixed pools per layer group (former default ratios)",
    "shared": "shared page arena (default)",
}


def plot(result: dict, path: Path) -> None:
    """Draws ``result`` (what :func:`lightkv_perf.capacity.run` returns) to the PNG ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = result["settings"]
    layouts = list(LABELS)
    figure, (by_mix, trace, by_decode) = plt.subplots(1, 3, figsize=(18, 4.8))

    names = list(result["requests"])
    width = 0.8 / len(layouts)
    for index, layout in enumerate(layouts):
        xs = [i + (index - 1) * width for i in range(len(names))]
        heights = [result["requests"][name][layout] for name in names]
        bars = by_mix.bar(xs, heights, width=width, label=LABELS[layout])
        for bar, height in zip(bars, heights, strict=True):
            by_mix.annotate(
                f"{height:g}", (bar.get_x() + bar.get_width() / 2, height), ha="center", va="bottom", fontsize=8
            )
    by_mix.set_xticks(range(len(names)), names)
    top = max(result["requests"][name][layout] for name in names for layout in layouts)
    by_mix.set(
        ylabel="requests held at once",
        title=f"{settings['budget_gib']:g} GiB of KV, by request mix",
        ylim=(0, top * 1.4),
    )
    by_mix.legend(loc="upper left", fontsize=8)

    served = result["shifting_trace"]
    for layout in layouts:
        held = served[layout]["held_per_step"]
        trace.plot(range(len(held)), held, label=f"{LABELS[layout]}: {served[layout]['steps']} steps")
    trace.set(
        xlabel="decode step",
        ylabel="requests held",
        title=f"trace of {len(served['requests'])} requests shifting from images to text",
    )
    trace.legend(loc="upper right", fontsize=8)
    trace.grid(alpha=0.3)

    sweep = result["max_new_tokens_sweep"]
    xs = [point["max_new_tokens"] for point in sweep]
    for name, style in (("vision", "-"), ("50/50", "--"), ("text", ":")):
        for layout, marker in (("static", "s"), ("shared", "o")):
            gains = [point[name][layout] / point[name]["one"] for point in sweep]
            by_decode.plot(xs, gains, f"{marker}{style}", label=f"{name}, {layout}")
    by_decode.axhline(1.0, color="grey", linewidth=0.8)
    by_decode.set(
        xlabel="decode slots reserved per request (max_new_tokens)",
        ylabel="requests held / one pool",
        title="gain over one pool",
        xticks=xs,
    )
    by_decode.legend(loc="lower left", fontsize=8, ncol=2)
    by_decode.grid(alpha=0.3)

    figure.suptitle(
        f"LLaVA-NeXT-7B KV shape, LightKV 12-18-24 / 4-2-1 / 0.5, max_new_tokens {settings['max_new_tokens']}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
