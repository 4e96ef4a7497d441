"""The results of :mod:`lightkv_perf.kernels`: ratios to the fallback, achieved bandwidth, the tables and the plot."""

from __future__ import annotations

from pathlib import Path

from lightkv_perf import roofline

KERNELS = ("window_match", "merge_compact")
IMPLS = ("triton", "torch", "plain")


def ratios(rows: list[dict]) -> list[dict]:
    """For every (kernel, prompt, stage): each implementation's time over the fallback's, and triton over plain."""
    groups: dict[tuple, dict[str, float]] = {}
    for row in rows:
        groups.setdefault((row["kernel"], row["prompt"], row["stage"]), {})[row["impl"]] = row["time_s"]
    result = []
    for (kernel, prompt, stage), times in groups.items():
        entry = {
            "kernel": kernel,
            "prompt": prompt,
            "stage": stage,
            "vs_torch": {impl: round(t / times["torch"], 4) for impl, t in times.items()},
        }
        if "triton" in times:
            entry["triton_vs_plain"] = round(times["triton"] / times["plain"], 4)
        result.append(entry)
    return result


def bandwidth(rows: list[dict], cases: list[dict]) -> list[dict]:
    """Achieved bandwidth of the Triton rows: the roofline ``bytes`` of the case over the time, in GB/s."""
    moved = {(c["kernel"], c["prompt"], c["stage"]): c["roofline"]["bytes"] for c in cases}
    return [
        {
            "kernel": row["kernel"],
            "prompt": row["prompt"],
            "stage": row["stage"],
            "bytes": moved[(row["kernel"], row["prompt"], row["stage"])],
            "gb_per_s": round(moved[(row["kernel"], row["prompt"], row["stage"])] / row["time_s"] / 1e9, 1),
        }
        for row in rows
        if row["impl"] == "triton"
    ]


def plot(result: dict, path: Path) -> None:
    """Bars of each implementation's time relative to the fallback, per prompt and stage, one panel per kernel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    figure, axes = plt.subplots(1, len(KERNELS), figsize=(7 * len(KERNELS), 4.5), squeeze=False)
    windows = {(c["prompt"], c["stage"]): c["window"] for c in result["cases"]}
    for ax, kernel in zip(axes[0], KERNELS, strict=True):
        entries = [r for r in result["ratios"] if r["kernel"] == kernel]
        impls = [impl for impl in IMPLS if any(impl in r["vs_torch"] for r in entries)]
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            xs = [j + (i - (len(impls) - 1) / 2) * width for j in range(len(entries))]
            values = [r["vs_torch"].get(impl, float("nan")) for r in entries]
            bars = ax.bar(xs, values, width=width, label=impl)
            ax.bar_label(bars, labels=[f"{v:.2g}" for v in values], fontsize=7)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.set_xticks(range(len(entries)))
        ax.set_xticklabels(
            [f"{r['prompt']}\nstage {r['stage']}, W={windows[(r['prompt'], r['stage'])]}" for r in entries], fontsize=7
        )
        ax.set(ylabel="time / PyTorch fallback (log scale)", title=kernel)
        ax.legend(fontsize=8)
    figure.suptitle(f"LightKV kernels, D={result['hidden']} {result['dtype']}, {result['machine']['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def print_table(result: dict) -> None:
    vs_torch = {(r["kernel"], r["prompt"], r["stage"]): r["vs_torch"] for r in result["ratios"]}
    header = f"{'kernel':<14}{'prompt':<12}{'stage':>6}{'W':>3}{'tokens':>8}  {'impl':<7}{'ms':>10}{'x torch':>9}"
    print(header + f"{'peak MiB':>10}")
    for row in result["rows"]:
        ratio = vs_torch[(row["kernel"], row["prompt"], row["stage"])][row["impl"]]
        print(
            f"{row['kernel']:<14}{row['prompt']:<12}{row['stage']:>6}{row['window']:>3}{row['tokens']:>8}  "
            f"{row['impl']:<7}{row['time_s'] * 1e3:>10.3f}{ratio:>9.3f}{row['peak_bytes'] / 2**20:>10.2f}"
        )
    for skipped in result["skipped"]:
        print(f"skipped {skipped['impl']}: {skipped['reason']}")
    if "timing_note" in result:
        print(result["timing_note"])


def print_roofline(result: dict) -> None:
    """Every case's Triton floor on each GPU; on a GPU run beside the Triton time and that time over this GPU's
    floor (``n/a`` on a GPU without datasheet numbers here)."""
    device = result["machine"]["device"]
    triton = {(r["kernel"], r["prompt"], r["stage"]): r["time_s"] for r in result["rows"] if r["impl"] == "triton"}
    compared = roofline.MEASURED_HEADER if triton else ""
    print("\nroofline of the Triton kernels (float16, the launch configs of this device; see perf/roofline.py)")
    print(f"{'kernel':<14}{'prompt':<12}{'stage':>6}{'MB':>9}{'MFLOP':>9}{roofline.FLOOR_HEADER}{compared}")
    for case in result["cases"]:
        record = case["roofline"]
        measured = roofline.measured_cells(triton.get((case["kernel"], case["prompt"], case["stage"])), record, device)
        print(
            f"{case['kernel']:<14}{case['prompt']:<12}{case['stage']:>6}{record['bytes'] / 1e6:>9.2f}"
            f"{record['flops'] / 1e6:>9.1f}{roofline.floor_cells(record)}{measured}"
        )
    if not triton:
        print("The floors apply to GPU rows only: no Triton row runs here, so nothing is compared.")
