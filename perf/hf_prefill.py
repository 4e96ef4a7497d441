"""Prefill of a LLaVA-style transformers model, stock vs LightKV, side by side in one run.

The model is a ``LlavaForConditionalGeneration`` built from a config with random weights: a Llama text model of
about 270M parameters (LLaVA-1.5's head layout, scaled down) behind a small CLIP tower at 336 px / patch 14, i.e.
576 vision tokens. LightKV runs the released 12-18-24 / 4-2-1 / 0.5 schedule scaled to the text model's depth
through ``lightkv_adapters.hf.apply_lightkv``. Stock and LightKV prefills alternate, so both see the same machine
state; the KV bytes are read from the ``DynamicCache`` each prefill leaves behind.

    .venv/bin/python perf/hf_prefill.py            # about 2 minutes on 2 CPU cores
    .venv/bin/python perf/hf_prefill.py --quick    # one timed repeat

Writes ``perf/results/hf-prefill-<device>.json`` and ``.png``. On a CPU only the ratios are meaningful.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import CLIPVisionConfig, DynamicCache, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from lightkv_adapters.hf import lightkv
from lightkv_core.config import PRESET_DEPTHS, PRESETS

RESULTS = Path(__file__).parent / "results"
IMAGE_TOKEN = 32000
TEXT_BEFORE, TEXT_AFTER = 35, 24  # LLaVA-1.5's system prompt before the image, a question after it


def build_model(layers: int, dtype: torch.dtype) -> LlavaForConditionalGeneration:
    """LLaVA-style model: Llama text model (width 1024, 16 heads, SwiGLU 2816) behind a 2-layer CLIP tower."""
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=336,
        patch_size=14,
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=4096,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.set_attn_implementation("sdpa")
    return model


def make_inputs(dtype: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(1, 32000, (n,), generator=generator)  # noqa: E731
    ids = torch.cat([text(TEXT_BEFORE), torch.full((576,), IMAGE_TOKEN), text(TEXT_AFTER)])[None]
    pixels = torch.randn(1, 3, 336, 336, generator=generator).to(dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}


def prefill(model, inputs: dict) -> tuple[float, DynamicCache]:
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        started = time.perf_counter()
        model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - started, cache


def cache_bytes(cache: DynamicCache) -> tuple[int, list[int]]:
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    total = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    return total, lengths


def layer_flops(tokens: int, text: LlamaConfig) -> int:
    """Analytic FLOPs of one decoder layer on ``tokens`` tokens (multiply-add = 2): the q/k/v/o and SwiGLU
    projections, plus causal attention scores and weighted values (``tokens^2 / 2`` pairs each)."""
    head_dim = text.hidden_size // text.num_attention_heads
    projections = text.hidden_size * head_dim * (2 * text.num_attention_heads + 2 * text.num_key_value_heads)
    mlp = 3 * text.hidden_size * text.intermediate_size
    attention = 2 * text.num_attention_heads * head_dim * tokens * (tokens + 1) // 2
    return 2 * tokens * (projections + mlp) + 2 * attention


def run(args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(args.layers, dtype).to(device)
    inputs = {name: value.to(device) for name, value in make_inputs(dtype).items()}
    config = PRESETS["llava-1.5"].scaled_to(args.layers, PRESET_DEPTHS["llava-1.5"])
    parameters = sum(p.numel() for p in model.parameters())
    text_parameters = sum(p.numel() for p in model.model.language_model.parameters())

    times: dict[str, list[float]] = {"stock": [], "lightkv": []}
    kv: dict[str, tuple[int, list[int]]] = {}
    reduce_seconds: list[float] = []
    for repeat in range(args.repeats + 1):  # the first round warms up and is not timed
        seconds, cache = prefill(model, inputs)
        kv["stock"] = cache_bytes(cache)
        if repeat:
            times["stock"].append(seconds)
        with lightkv(model, config):
            seconds, cache = prefill(model, inputs)
            stats = model.lightkv_stats
        kv["lightkv"] = cache_bytes(cache)
        if repeat:
            times["lightkv"].append(seconds)
            reduce_seconds.append(stats.reduce_seconds)
        print(f"round {repeat}: " + ", ".join(f"{n} {t[-1]:.3f}s" for n, t in times.items() if t), flush=True)

    text = model.config.text_config
    seq = inputs["input_ids"].shape[1]
    stock_time, lightkv_time = statistics.median(times["stock"]), statistics.median(times["lightkv"])
    flops_stock = [layer_flops(n, text) for n in kv["stock"][1]]
    flops_lightkv = [layer_flops(n, text) for n in kv["lightkv"][1]]
    return {
        "benchmark": "hf-prefill",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads",
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "commit": _commit(),
        },
        "model": {
            "class": type(model).__name__,
            "parameters": parameters,
            "text_parameters": text_parameters,
            "layers": args.layers,
            "hidden_size": text.hidden_size,
            "kv_heads": text.num_key_value_heads,
            "dtype": str(dtype).removeprefix("torch."),
            "prompt_tokens": seq,
            "vision_tokens": 576,
        },
        "schedule": {
            "merge_layers": config.merge_layers,
            "merge_windows": config.merge_windows,
            "merge_ratios": config.merge_ratios,
        },
        "repeats": args.repeats,
        "stock": {"prefill_s": times["stock"], "kv_bytes": kv["stock"][0], "kv_lengths": kv["stock"][1]},
        "lightkv": {
            "prefill_s": times["lightkv"],
            "kv_bytes": kv["lightkv"][0],
            "kv_lengths": kv["lightkv"][1],
            "vision_tokens": stats.vision_tokens[:, 0].tolist(),
            "vision_retention": round(float(stats.vision_retention()[0]), 4),
            "reduce_s": reduce_seconds,
        },
        "flops_per_layer": {"stock": flops_stock, "lightkv": flops_lightkv},
        "ratios": {
            "prefill_time": round(lightkv_time / stock_time, 3),
            "text_flops": round(sum(flops_lightkv) / sum(flops_stock), 3),
            "kv_bytes": round(kv["lightkv"][0] / kv["stock"][0], 3),
            "reduce_share_of_prefill": round(statistics.median(reduce_seconds) / lightkv_time, 4),
        },
    }


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (lengths, times) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    layers = range(len(result["stock"]["kv_lengths"]))
    lengths.bar([i - 0.2 for i in layers], result["stock"]["kv_lengths"], width=0.4, label="stock")
    lengths.bar([i + 0.2 for i in layers], result["lightkv"]["kv_lengths"], width=0.4, label="LightKV")
    lengths.set(xlabel="decoder layer", ylabel="KV tokens held", title="KV cache per layer after prefill")
    lengths.legend(loc="lower left")
    medians = [statistics.median(result[name]["prefill_s"]) for name in ("stock", "lightkv")]
    times.bar(["stock", "LightKV"], medians, color=["C0", "C1"])
    times.set(ylabel="prefill time (s, median)", title=f"prefill ({result['machine']['device']})")
    ratio = result["ratios"]
    figure.suptitle(
        f"{result['model']['class']} {result['model']['parameters'] / 1e6:.0f}M params, 576 vision tokens: "
        f"KV x{ratio['kv_bytes']}, prefill time x{ratio['prefill_time']}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16, help="text model depth (default 16: about 270M parameters)")
    parser.add_argument("--repeats", type=int, default=5, help="timed prefills of each kind (default 5)")
    parser.add_argument("--quick", action="store_true", help="one timed repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    result = run(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"hf-prefill-{device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, path.with_suffix(".png"))
    ratios = result["ratios"]
    print(
        f"wrote {path}: KV bytes x{ratios['kv_bytes']}, text FLOPs x{ratios['text_flops']}, "
        f"prefill time x{ratios['prefill_time']}, scoring+merge {ratios['reduce_share_of_prefill']:.1%} of the prefill"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
