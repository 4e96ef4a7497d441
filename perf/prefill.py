"""End-to-end prefill, stock vs LightKV, on the reference decoder and a Transformers LLaVA model.

Both models have random weights (no hub) and the text shape of ``--size``: ``small`` (width 1024, 16 layers, 16
heads, SwiGLU 2816; the CPU default) or ``7b`` (LLaMA-7B's shape, bf16; the GPU default).

- The reference decoder (``lightkv_adapters.reference``) prefills input embeddings: the text tokens' embeddings
  around random vision embeddings, so no vision tower is timed; LightKV is its ``reduction``.
- The Transformers model is a ``LlavaForConditionalGeneration`` (Llama text model, sdpa attention) behind a small
  CLIP tower at 336 px / patch 14; its prefill runs from ``input_ids`` and ``pixel_values``, tower and projector
  included; LightKV goes in through ``lightkv_adapters.hf.lightkv``.

LightKV runs the released LLaVA schedule (12-18-24 / 4-2-1 / 0.5 at 32 layers) scaled to the model's depth. Each
prompt has 35 text tokens, ``--vision-tokens`` image tokens (24x24 per image: 576 is LLaVA-1.5's one image, 2,880
LLaVA-NeXT's five) and a 24-token question; batch 1. Stock and LightKV prefills alternate in one process (one
untimed warm-up round, then ``--repeats`` timed ones; medians); on a GPU the clock is read after a
synchronisation. KV tokens and bytes per layer are read from the cache each prefill leaves behind; FLOPs are
analytic. On a CPU only the ratios count.

    lightkv bench prefill --quick                 # or python -m lightkv_perf.prefill; 2 CPU cores: about 2 minutes

Writes ``<out>/prefill-<device>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lightkv_core.config import PRESET_DEPTHS, PRESETS, LightKVConfig
from lightkv_core.kernels.launch import BACKENDS, choose_backend
from lightkv_core.methods import LightKV
from lightkv_core.stats import PrefillStats
from lightkv_perf.common import add_common_arguments, device, device_tag, run_record, synchronize, write_json

MODELS = ("reference", "hf")
PATCH = 14  # CLIP patch size in pixels
IMAGE_TOKEN_ID = 32000
VOCAB_SIZE = 32064
TEXT_BEFORE, TEXT_AFTER = 35, 24  # LLaVA-1.5's system prompt before the images, a question after them
GPU_NOTE = (
    "GPU run: the clock is read after torch.cuda.synchronize() around every prefill; reduce_s is timed by the "
    "adapters, which synchronise before and after each stage."
)
CPU_NOTE = (
    "CPU run: absolute times only put the ratios in context; the ratios (LightKV / stock, measured side by side in "
    "one process) are what count. Absolute times come from a GPU."
)


@dataclass(frozen=True)
class TextShape:
    """Shape of a Llama-style text model: width ``D``, depth, query heads ``H``, KV heads ``Hk`` (``head_dim = D /
    H``) and SwiGLU inner width."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class Size:
    """A benchmark size: the text model, the CLIP tower of the Transformers model (width, depth) and the vision
    tokens per image side (24: 336 px / patch 14, LLaVA-1.5's 24x24 = 576 per image)."""

    text: TextShape
    tower_width: int
    tower_layers: int
    image_side: int
    note: str

    @property
    def image_tokens(self) -> int:
        return self.image_side * self.image_side


SIZES: dict[str, Size] = {
    # for the tests: a few seconds in all
    "tiny": Size(TextShape(64, 6, 4, 4, 128), 32, 1, image_side=12, note="tiny test model, 12x12 images"),
    # hf_prefill's text model: LLaVA-1.5's multi-head KV at width 1024 (238M text parameters)
    "small": Size(TextShape(1024, 16, 16, 16, 2816), 256, 2, 24, "LLaVA-1.5's head layout, scaled down"),
    # LLaMA-7B's shape (Vicuna-7B, LLaVA-1.5-7B's text model)
    "7b": Size(TextShape(4096, 32, 32, 32, 11008), 256, 2, 24, "LLaMA-7B shape"),
}


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


def schedule_for(layers: int) -> LightKVConfig:
    """The released LLaVA schedule (12-18-24 / 4-2-1 / 0.5 at 32 layers) scaled to ``layers``."""
    return PRESETS["llava-1.5"].scaled_to(layers, PRESET_DEPTHS["llava-1.5"])


@dataclass
class Prefill:
    """One prefill: wall seconds, tokens and bytes (K and V) each layer's cache holds, and the adapter's stats
    (``None`` for a stock Transformers prefill, which records none)."""

    seconds: float
    kv_lengths: list[int]
    kv_layer_bytes: list[int]
    stats: PrefillStats | None


@dataclass(frozen=True)
class Case:
    """A model ready to prefill one prompt: ``prefill(compressed)`` runs it stock (``False``) or with LightKV;
    ``shape`` is read from the model's own config (for the FLOPs)."""

    model: str
    model_class: str
    shape: TextShape
    parameters: int
    images: int
    vision_tokens: int
    prompt_tokens: int
    timed: str
    prefill: Callable[[bool], Prefill]


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of ``fn()``, with the GPU synchronised before and after (no-grad)."""
    with torch.no_grad():
        synchronize()
        started = time.perf_counter()
        fn()
        synchronize()
        return time.perf_counter() - started


@contextmanager
def building(on: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Parameters created in the block are allocated on ``on`` in ``dtype`` (random 7B weights are drawn on the GPU,
    never as float32 on the host)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with on:
            yield
    finally:
        torch.set_default_dtype(previous)


def kv_layer_bytes(layers: Sequence) -> list[int]:
    """Bytes of each cache layer's keys and values (``keys``/``values``: ``(B, Hk, L, d)``, same size)."""
    return [2 * layer.keys.numel() * layer.keys.element_size() for layer in layers]


def prompt_ids(images: int, side: int) -> tuple[torch.Tensor, list[tuple[int, int, int, int]]]:
    """``(input_ids (1, S) int64, spans)``: 35 random text tokens, ``images`` runs of ``side * side`` image tokens,
    24 text tokens; one ``(start, end, side, side)`` span per image."""
    generator = torch.Generator().manual_seed(0)
    before = torch.randint(1, IMAGE_TOKEN_ID, (TEXT_BEFORE,), generator=generator)
    after = torch.randint(1, IMAGE_TOKEN_ID, (TEXT_AFTER,), generator=generator)
    per_image = side * side
    vision = torch.full((images * per_image,), IMAGE_TOKEN_ID)
    spans = [(TEXT_BEFORE + i * per_image, TEXT_BEFORE + (i + 1) * per_image, side, side) for i in range(images)]
    return torch.cat([before, vision, after])[None], spans


def build_reference(size: Size, on: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The reference ``Decoder`` with the text shape of ``size`` and random weights (seed 0)."""
    from lightkv_adapters.reference.decoder import Decoder, DecoderConfig

    text = size.text
    config = DecoderConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_layers=text.num_layers,
        num_heads=text.num_heads,
        num_kv_heads=text.num_kv_heads,
    )
    torch.manual_seed(0)
    with building(on, dtype):
        return Decoder(config).eval()


def reference_case(model: torch.nn.Module, size: Size, images: int, method: LightKV) -> Case:
    """The reference decoder prefilling input embeddings ``(1, S, D)``: token embeddings around ``images`` images of
    random vision embeddings; LightKV as its ``reduction``."""
    from lightkv_adapters.reference.decoder import LayerwiseKVCache

    on, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    ids, spans = prompt_ids(images, size.image_side)
    vision_tokens = images * size.image_tokens
    with torch.no_grad():
        embeds = model.model.embed_tokens(ids.to(on))
    vision = torch.randn(vision_tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    embeds[0, TEXT_BEFORE : TEXT_BEFORE + vision_tokens] = vision.to(on, dtype)

    def prefill(compressed: bool) -> Prefill:
        cache = LayerwiseKVCache.empty(model.config.num_layers)
        reduction = method if compressed else None
        stats: list[PrefillStats] = []
        seconds = timed(
            lambda: stats.append(
                model(embeds, spans=[spans], cache=cache, reduction=reduction, last_logits_only=True)[1]
            )
        )
        return Prefill(seconds, [layer.length for layer in cache.layers], kv_layer_bytes(cache.layers), stats[0])

    c = model.config
    return Case(
        "reference",
        type(model).__name__,
        TextShape(c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size),
        sum(p.numel() for p in model.parameters()),
        images,
        vision_tokens,
        ids.shape[1],
        "Decoder.forward on input embeddings (no vision tower), last-token logits",
        prefill,
    )


def build_hf(size: Size, on: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A ``LlavaForConditionalGeneration`` with random weights (seed 0): a Llama text model of ``size`` (sdpa)
    behind a CLIP tower of ``size`` with patch 14 (336 px images for a 24x24 grid)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = size.text
    vision_config = CLIPVisionConfig(
        hidden_size=size.tower_width,
        intermediate_size=4 * size.tower_width,
        num_hidden_layers=size.tower_layers,
        num_attention_heads=max(1, size.tower_width // 64),
        image_size=size.image_side * PATCH,
        patch_size=PATCH,
    )
    text_config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_layers,
        num_attention_heads=text.num_heads,
        num_key_value_heads=text.num_kv_heads,
        max_position_embeddings=4096,
    )
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=-1
    )
    torch.manual_seed(0)
    with building(on, dtype):
        model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation("sdpa")
    return model


def hf_case(model: torch.nn.Module, size: Size, images: int, method: LightKV) -> Case:
    """The Transformers model prefilling ``input_ids`` ``(1, S)`` and ``pixel_values`` ``(images, 3, P, P)``
    (``P = 14 * image_side``: 336 px) into a ``DynamicCache``; LightKV through ``lightkv_adapters.hf.lightkv``."""
    from transformers import DynamicCache

    from lightkv_adapters.hf import lightkv

    on, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    ids, _ = prompt_ids(images, size.image_side)
    pixels = torch.randn(
        images, 3, size.image_side * PATCH, size.image_side * PATCH, generator=torch.Generator().manual_seed(1)
    )
    inputs = {
        "input_ids": ids.to(on),
        "attention_mask": torch.ones_like(ids, device=on),
        "pixel_values": pixels.to(on, dtype),
    }

    # transformers 5.24 renamed the forward's past_key_values to cache (the old name warns until 5.40)
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def prefill(compressed: bool) -> Prefill:
        cache = DynamicCache(config=model.config.text_config)
        run = lambda: model(**inputs, **{cache_name: cache}, use_cache=True, logits_to_keep=1)  # noqa: E731
        stats = None
        if compressed:
            with lightkv(model, method):
                seconds = timed(run)
                stats = model.lightkv_stats
        else:
            seconds = timed(run)
        return Prefill(seconds, [layer.keys.shape[2] for layer in cache.layers], kv_layer_bytes(cache.layers), stats)

    text, tower = model.config.text_config, model.config.vision_config
    return Case(
        "hf",
        type(model).__name__,
        TextShape(
            text.hidden_size,
            text.num_hidden_layers,
            text.num_attention_heads,
            text.num_key_value_heads,
            text.intermediate_size,
        ),
        sum(p.numel() for p in model.parameters()),
        images,
        images * size.image_tokens,
        ids.shape[1],
        f"model forward from input_ids and pixel_values ({tower.num_hidden_layers}-layer CLIP tower of width "
        f"{tower.hidden_size}, projector, text model), last-token logits",
        prefill,
    )


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (``--quick`` and ``--out`` included)."""
    add_common_arguments(parser)
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default=None,
        help="text model: small (width 1024, 16 layers) or 7b (LLaMA-7B shape); default 7b on a GPU, small on a "
        "CPU; tiny is for the tests",
    )
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument(
        "--vision-tokens",
        default=None,
        help="comma-separated vision-token counts, whole images of the size's grid (24x24: multiples of 576); "
        "default one and five images: 576,2880 (LLaVA-1.5, LLaVA-NeXT)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per case (default 5, --quick 1)")
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="LightKV's kernels: auto (Triton on a GPU, the PyTorch fallbacks on a CPU), triton or torch",
    )


def run(args: argparse.Namespace) -> int:
    """Run every (model, vision-token count) case, write the JSON and PNG, print the table."""
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        raise SystemExit(f"--models: choose from {', '.join(MODELS)}, got {args.models!r}")
    on = device()
    size_name = args.size or ("7b" if on.type == "cuda" else "small")
    size = SIZES[size_name]
    per_image = size.image_tokens
    counts = [int(n) for n in (args.vision_tokens or f"{per_image},{5 * per_image}").split(",") if n.strip()]
    if not counts or any(n <= 0 or n % per_image for n in counts):
        raise SystemExit(
            f"--vision-tokens: positive multiples of {per_image} for this size, got {args.vision_tokens!r}"
        )
    dtype = torch.bfloat16 if on.type == "cuda" else torch.float32
    repeats = args.repeats or (1 if args.quick else 5)
    config = schedule_for(size.text.num_layers)
    method = LightKV(config, args.backend)
    builders = {"reference": (build_reference, reference_case), "hf": (build_hf, hf_case)}
    cases = []
    for name in models:
        build, case = builders[name]
        model = build(size, on, dtype)
        cases.extend(measure(case(model, size, n // per_image, method), repeats) for n in counts)
        del model  # one model on the device at a time
        gc.collect()
        if on.type == "cuda":
            torch.cuda.empty_cache()
    result = {
        **run_record("prefill"),
        "size": size_name,
        "text_model": {**asdict(size.text), "note": size.note},
        "dtype": str(dtype).removeprefix("torch."),
        "schedule": {
            "preset": "llava-1.5",
            "merge_layers": list(config.merge_layers),
            "merge_windows": list(config.merge_windows),
            "merge_ratios": list(config.merge_ratios),
            "backend": choose_backend(args.backend, on, "LightKV"),
        },
        "prompt": {"text_before": TEXT_BEFORE, "text_after": TEXT_AFTER, "image_grid": [size.image_side] * 2},
        "repeats": repeats,
        "cases": cases,
    }
    result["timing_note"] = CPU_NOTE if on.type == "cpu" else GPU_NOTE
    path = write_json(result, Path(args.out) / f"prefill-{device_tag()}.json")
    plot(result, path.with_suffix(".png"))
    print(table(result))
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightkv_perf.prefill", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
