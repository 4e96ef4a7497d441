"""``apply_lightkv`` / ``remove_lightkv`` / ``with lightkv(model)``: the hooks that run a compression method
inside a stock transformers model.

What the hooks do, per forward of the text model:

* **Prefill** (empty cache, or no cache): the multimodal model's pre-hook finds the vision spans in
  ``input_ids``; the attention wrapper (:mod:`.attention`) captures the post-RoPE ``q``/``k`` of each
  scheduled layer; that layer's forward hook hands its output to the method (``lightkv_core``), which
  returns the shorter hidden states. Every later layer's pre-hook swaps in the mask, rotary ``cos``/``sin``
  and position ids gathered at the survivors' original indices (positions stay original, so
  ``generate()``'s own position bookkeeping, which reads the full-length layer 0, stays right).
* **Post-prefill eviction** (PrefixKV, AirCache, LOOK-M): every layer's ``q``/``k`` is captured and the
  method keeps a few statistics of it; once the text model has run, each layer's cache is replaced by the
  method's compacted one (layers may end at different lengths). The prefill's own outputs are untouched.
* **Decode** on a compressed cache: nothing merges; each shortened layer's mask is gathered to the columns
  that layer holds (its prefill survivors, then every decoded token).

Batches are left-padded. Samples whose survivor counts differ are padded on the left with *dead slots*:
zero hidden states that every real query masks out (a dead query sees only itself, so no row is empty).
"""

from __future__ import annotations

import functools
import inspect
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from lightkv_adapters.hf import attention
from lightkv_adapters.hf.families import Family, family_of
from lightkv_adapters.hf.versions import warn_if_untested
from lightkv_core.config import PRESET_DEPTHS, PRESETS, LightKVConfig
from lightkv_core.methods import METHODS, CompressionMethod, KVEviction, LightKV, PrefillReduction, method_by_name
from lightkv_core.spans import VisionSpan, vision_token_mask
from lightkv_core.stats import PrefillStats

_ADAPTERS: weakref.WeakKeyDictionary[nn.Module, _Adapter] = weakref.WeakKeyDictionary()


def apply_lightkv(
    model: nn.Module, config: LightKVConfig | CompressionMethod | str | None = None, *, backend: str = "auto"
) -> nn.Module:
    """Hook a compression method into ``model`` in place; ``generate()`` and ``forward()`` keep their API.

    Args:
        model: a ``LlavaForConditionalGeneration`` (Llama or Qwen2 text model),
            ``LlavaNextForConditionalGeneration``, ``Qwen2VLForConditionalGeneration`` or
            ``Qwen2_5_VLForConditionalGeneration`` loaded with ``attn_implementation="sdpa"`` or ``"eager"``.
        config: a :class:`LightKVConfig` (used as given), the name of a released preset (scaled to the
            model's depth), the name of a method in ``lightkv_core.METHODS`` (``"fastv"``, ``"prefixkv"``,
            ... with its defaults, see :func:`~lightkv_core.methods.method_by_name`), any method instance
            (:class:`PrefillReduction` such as ``FastV(2, 0.5)``, or :class:`KVEviction` such as
            ``PrefixKV(retention=0.3)``), or ``None``: the released schedule of the model's family scaled to
            its depth.
        backend: kernels of a method given by name or as a schedule, ``"auto"``, ``"triton"`` or ``"torch"``.

    After each prefill ``model.lightkv_stats`` holds a :class:`~lightkv_core.stats.PrefillStats`. A transformers
    release outside the tested range (:data:`~lightkv_adapters.hf.versions.TESTED_TRANSFORMERS`) gets a warning.

    Raises:
        NotImplementedError for an unsupported model class, text backbone or attention implementation;
        ValueError for a schedule that does not fit the model or a method that renumbers positions;
        RuntimeError if lightkv is already applied.
    """
    if model in _ADAPTERS:
        raise RuntimeError("lightkv is already applied to this model; call remove_lightkv(model) first")
    warn_if_untested()
    family = family_of(model)
    text_model = model.model.language_model
    method = _method_for(family, text_model.config.num_hidden_layers, config, backend)
    _ADAPTERS[model] = _Adapter(model, family, text_model, method)
    return model


def remove_lightkv(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_lightkv`: hooks removed, attention implementation restored, ``lightkv_stats`` gone.

    Raises:
        ValueError if lightkv is not applied to ``model``.
    """
    adapter = _ADAPTERS.pop(model, None)
    if adapter is None:
        raise ValueError("lightkv is not applied to this model")
    adapter.detach()
    return model


@contextmanager
def lightkv(
    model: nn.Module, config: LightKVConfig | CompressionMethod | str | None = None, *, backend: str = "auto"
) -> Iterator[nn.Module]:
    """``with lightkv(model, config): model.generate(...)``: :func:`apply_lightkv` for the block only."""
    apply_lightkv(model, config, backend=backend)
    try:
        yield model
    finally:
        remove_lightkv(model)


def _method_for(
    family: Family, depth: int, config: LightKVConfig | CompressionMethod | str | None, backend: str
) -> CompressionMethod:
    if isinstance(config, str) and config.lower() in METHODS:
        config = method_by_name(config.lower(), depth, preset=family.preset, backend=backend)
    elif config is None or isinstance(config, str):
        preset = family.preset if config is None else config.lower().replace("_", "-")
        if preset not in PRESETS:
            raise ValueError(
                f"unknown preset or method {config!r}; presets: {', '.join(sorted(PRESETS))}; methods: "
                f"{', '.join(METHODS)}"
            )
        config = PRESETS[preset].scaled_to(depth, PRESET_DEPTHS[preset])
    method = LightKV(config, backend) if isinstance(config, LightKVConfig) else config
    if isinstance(method, KVEviction):
        return method
    if not isinstance(method, PrefillReduction):
        raise TypeError(
            f"config must be a LightKVConfig, a preset or method name, a PrefillReduction or a KVEviction, got "
            f"{type(config)}"
        )
    if method.position_mode != "original":
        raise ValueError(
            "the transformers adapter needs positions='original' (generate() numbers new tokens from the "
            f"uncompressed length); this method uses {method.position_mode!r}"
        )
    layers = method.reduce_layers
    if not layers or min(layers) < 0 or max(layers) >= depth:
        raise ValueError(f"reduction layers {layers} must lie in [0, {depth}) for this {depth}-layer text model")
    return method


@dataclass
class _CacheLayout:
    """Which prefill tokens each shortened layer of a compressed cache holds.

    Attributes:
        prefill_length: tokens of the prefill.
        columns: per layer, ``None`` (the layer holds the full prefill) or ``(B, L)`` int64, the prefill
            index of every slot, ``-1`` for a dead slot (after an eviction: the token head 0 holds; the
            other heads may hold other tokens, in the same slots).
        decoded: tokens decoded into the cache since the prefill.
    """

    prefill_length: int
    columns: list[torch.Tensor | None]
    decoded: int = 0


@dataclass
class _Run:
    """State of one forward of the text model."""

    spans: list[list[VisionSpan]] | None  # None: not known (no input_ids)
    real: torch.Tensor | None
    has_vision_tokens: bool
    mode: str = ""  # "prefill", "decode" or "passthrough", set at layer 0
    cache: Cache | None = None
    layout: _CacheLayout | None = None
    columns: torch.Tensor | None = None  # (B, S') prefill index of every current slot, -1 dead
    positions: torch.Tensor | None = None  # (B, S') ordinal positions handed to the method
    is_vision: torch.Tensor | None = None
    prefill_length: int = 0
    dtype: torch.dtype = torch.float32
    originals: dict = field(default_factory=dict)  # layer 0's attention_mask / position_embeddings / position_ids
    swapped: dict | None = None  # the gathered ones for the current group of layers
    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    captured: dict = field(default_factory=dict)
    observations: list[torch.Tensor] = field(default_factory=list)
    kv_tokens: list[torch.Tensor] = field(default_factory=list)
    vision_tokens: list[torch.Tensor] = field(default_factory=list)
    reduce_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)


@dataclass
class _Inputs:
    """What the multimodal model's pre-hook learnt from ``input_ids``."""

    spans: list[list[VisionSpan]] | None
    has_vision_tokens: bool


class _Adapter:
    """lightkv on one model: its hooks, its method, the layout of every compressed cache."""

    def __init__(self, model: nn.Module, family: Family, text_model: nn.Module, method: CompressionMethod) -> None:
        self.model, self.family, self.text_model, self.method = model, family, text_model, method
        self.layers: Sequence[nn.Module] = text_model.layers
        self.evicting = isinstance(method, KVEviction)
        self.reduce_layers = set(range(len(self.layers))) if self.evicting else set(method.reduce_layers)
        self.layouts: weakref.WeakKeyDictionary[Cache, _CacheLayout] = weakref.WeakKeyDictionary()
        self.inputs: _Inputs | None = None
        self.run: _Run | None = None
        self.multimodal_signature = inspect.signature(model.model.forward)
        self.top_signature = inspect.signature(model.forward)
        self.recorded_grids: dict[str, torch.Tensor] = {}
        self.wrapped_methods = [self._record_grids(method, argument) for method, argument in family.grid_arguments]

        self.config_implementations = self._swap_attention()
        self.handles = [
            model.register_forward_pre_hook(self._before_model, with_kwargs=True),
            model.model.register_forward_pre_hook(self._before_multimodal, with_kwargs=True),
            model.model.register_forward_hook(self._after_multimodal),
            text_model.register_forward_pre_hook(self._before_text, with_kwargs=True),
            text_model.register_forward_hook(self._after_text),
        ]
        for index, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._layer_pre_hook(index), with_kwargs=True))
            if index in self.reduce_layers:
                self.handles.append(layer.register_forward_hook(self._layer_hook(index)))
                attention.capture_from(layer.self_attn, self._capture_hook(index))
        model.lightkv_stats = None

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        for index in self.reduce_layers:
            attention.stop_capture(self.layers[index].self_attn)
        for config, implementation in self.config_implementations:
            config._attn_implementation = implementation
        for name in self.wrapped_methods:
            delattr(self.model.model, name)
        del self.model.lightkv_stats

    def _record_grids(self, method: str, argument: str) -> str:
        """Wrap the base model's feature method ``method`` (on the instance) to remember its grid
        ``argument`` for the next prefill; returns the name to delete on removal."""
        base = self.model.model
        if method in vars(base):
            raise RuntimeError(f"{type(base).__name__}.{method} is already patched on this instance")
        original = getattr(base, method)
        signature = inspect.signature(original)

        @functools.wraps(original)
        def recording(*args, **kwargs):
            grid = signature.bind_partial(*args, **kwargs).arguments.get(argument)
            if grid is not None:
                self.recorded_grids[argument] = grid
            return original(*args, **kwargs)

        setattr(base, method, recording)
        return method

    def _swap_attention(self) -> list[tuple[object, str]]:
        """Point the text model's attention at the capturing wrappers; returns what to restore."""
        attention.register()
        configs = {id(self.text_model.config): self.text_model.config}
        for layer in self.layers:
            configs.setdefault(id(layer.self_attn.config), layer.self_attn.config)
        swapped = []
        for config in configs.values():
            implementation = config._attn_implementation
            if implementation not in attention.WRAPPED:
                raise NotImplementedError(
                    f"lightkv wraps the {sorted(attention.WRAPPED)} attention implementations, not "
                    f"{implementation!r}: load the model with attn_implementation='sdpa' or 'eager'"
                )
            swapped.append((config, implementation))
        for config, implementation in swapped:
            config._attn_implementation = attention.WRAPPED[implementation]
        return swapped

    # --- model-level hooks -------------------------------------------------------------------------

    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.top_signature.bind_partial(*args, **kwargs).arguments.get("labels") is not None:
            raise ValueError(
                "lightkv shortens the sequence in prefill, so logits no longer line up with labels; "
                "compute losses without lightkv (remove_lightkv(model))"
            )

    def _before_multimodal(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs = self.multimodal_signature.bind_partial(*args, **kwargs).arguments
        input_ids = inputs.get("input_ids")
        cache = _cache_argument(inputs)
        if input_ids is None:
            pixels = any(inputs.get(name) is not None for name in ("pixel_values", "pixel_values_videos"))
            self.inputs = _Inputs(None, pixels or bool(inputs.get("mm_encoder_outputs")))
            return
        vision_ids = [getattr(self.model.config, name, None) for name in ("image_token_id", "video_token_id")]
        has_vision_tokens = any(bool((input_ids == token).any()) for token in vision_ids if token is not None)
        prefill = cache is None or cache.get_seq_length() == 0
        spans = None
        if prefill:
            # grids given to this forward win; else those recorded when generate() encoded the images
            for _, argument in self.family.grid_arguments:
                recorded = self.recorded_grids.pop(argument, None)
                if inputs.get(argument) is None:
                    inputs[argument] = recorded
            spans = self.family.spans(self.model, inputs)
        self.inputs = _Inputs(spans, has_vision_tokens)

    def _after_multimodal(self, module: nn.Module, args: tuple, output: object) -> None:
        # grids recorded while this forward encoded its own images (transformers < 5.18 encodes inside forward)
        # belong to it, not to the next prefill
        self.recorded_grids.clear()

    def _before_text(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs, self.inputs = self.inputs, None
        embeds = kwargs.get("inputs_embeds")
        batch, seq = embeds.shape[:2] if embeds is not None else kwargs["input_ids"].shape
        mask = kwargs.get("attention_mask")
        if mask is None:
            real = torch.ones(batch, seq, dtype=torch.bool)
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
            real = mask[:, -seq:].to(torch.bool)
        else:
            real = None  # a prepared 4D mask or mask mapping: refused below if a prefill needs it
        if inputs is None:
            inputs = _Inputs(None, False)
        if (inputs.spans is not None and len(inputs.spans) != batch) or (
            real is not None and real.shape != (batch, seq)
        ):
            raise ValueError("the vision spans and attention mask do not match the text model's input")
        self.run = _Run(spans=inputs.spans, real=real, has_vision_tokens=inputs.has_vision_tokens)

    def _after_text(self, module: nn.Module, args: tuple, output: object) -> None:
        run, self.run = self.run, None
        if run is not None and run.mode == "decode":
            run.layout.decoded += 1
        if run is None or run.mode != "prefill":
            return
        original_tokens, original_vision_tokens = run.kv_tokens[0], run.vision_tokens[0]
        if self.evicting and run.cache is not None and any(run.spans):
            self._evict(run)
        if run.cache is not None and run.groups:
            columns = [None] * len(self.layers)
            for first, group_columns in run.groups:
                columns[first:] = [group_columns] * (len(self.layers) - first)
            self.layouts[run.cache] = _CacheLayout(run.prefill_length, columns)
        config = self.text_model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        element = torch.finfo(run.dtype).bits // 8
        self.model.lightkv_stats = PrefillStats(
            kv_tokens=torch.stack(run.kv_tokens),
            vision_tokens=torch.stack(run.vision_tokens),
            original_tokens=original_tokens,
            original_vision_tokens=original_vision_tokens,
            reduce_seconds=run.reduce_seconds,
            prefill_seconds=time.perf_counter() - run.started,
            bytes_per_token_layer=2 * config.num_key_value_heads * head_dim * element,
        )

    def _evict(self, run: _Run) -> None:
        """Replace every layer's prefill cache by the method's compacted one; record the layout and counts."""
        layers = run.cache.layers
        _synchronize(layers[0].keys)
        tick = time.perf_counter()
        evictions = self.method.evict(
            run.observations,
            [layer.keys for layer in layers],
            [layer.values for layer in layers],
            run.spans,
            attention_mask=run.real,
        )
        _synchronize(layers[0].keys)
        run.reduce_seconds += time.perf_counter() - tick
        for index, evicted in enumerate(evictions):
            layers[index].keys, layers[index].values = evicted.keys, evicted.values
            columns = evicted.slots[:, 0].to(run.real.device)
            alive = columns >= 0
            run.groups.append((index, columns))
            run.kv_tokens[index] = alive.sum(dim=1).cpu()
            run.vision_tokens[index] = (run.is_vision.gather(1, columns.clamp(min=0)) & alive).sum(dim=1).cpu()

    # --- layer hooks --------------------------------------------------------------------------------

    def _layer_pre_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            run = self.run
            if run is None:
                return None
            if index == 0:
                self._start(run, args[0] if args else kwargs["hidden_states"], kwargs)
            if run.mode == "prefill":
                run.kv_tokens.append(run.real.sum(dim=1).cpu())
                run.vision_tokens.append((run.is_vision & run.real).sum(dim=1).cpu())
                if run.columns is None:
                    return None
                if run.swapped is None:
                    run.swapped = _gather_prefill_inputs(run.originals, run.columns)
                return args, {**kwargs, **run.swapped}
            if run.mode == "decode":
                columns = run.layout.columns[index]
                if columns is None:
                    return None
                _check_cache_length(run.cache, index, columns, run.layout.decoded)
                prefill_length = run.layout.prefill_length
                full_length = prefill_length + run.layout.decoded + 1
                mask = _gather_decode_mask(kwargs.get("attention_mask"), columns, prefill_length, full_length)
                return args, {**kwargs, "attention_mask": mask}
            return None

        return hook

    def _start(self, run: _Run, hidden: torch.Tensor, kwargs: dict) -> None:
        """Decide at layer 0 whether this forward is a prefill, a decode step on a compressed cache, or
        untouched."""
        cache = _cache_argument(kwargs)
        if cache is not None and (
            not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers)
        ):
            raise TypeError(
                f"lightkv supports DynamicCache only (its layers may hold different lengths), got "
                f"{type(cache).__name__} with layers {sorted({type(layer).__name__ for layer in cache.layers})}"
            )
        run.cache = cache
        if cache is None or cache.get_seq_length() == 0:
            if run.real is None:
                raise NotImplementedError("lightkv needs a 2D attention_mask (or none) in prefill, not a 4D mask")
            if not bool(run.real[:, -1].all()):
                raise ValueError("lightkv needs left padding: set tokenizer.padding_side = 'left'")
            if run.spans is None:
                if run.has_vision_tokens:
                    raise ValueError(
                        "lightkv finds the image tokens through input_ids: pass input_ids, not inputs_embeds"
                    )
                run.spans = [[] for _ in range(hidden.shape[0])]
            run.mode = "prefill"
            run.real = run.real.to(hidden.device)
            run.positions = (run.real.long().cumsum(dim=1) - 1).clamp(min=0)
            run.is_vision = vision_token_mask(run.spans, run.real.shape[1], hidden.device)
            run.originals = {
                "attention_mask": kwargs.get("attention_mask"),
                "position_embeddings": kwargs.get("position_embeddings"),
                "position_ids": kwargs.get("position_ids"),
            }
            run.prefill_length, run.dtype = hidden.shape[1], hidden.dtype
            return
        if run.has_vision_tokens:
            raise ValueError(
                "lightkv compresses images in the prefill only: this forward brings vision tokens to a non-empty "
                "cache (a prefill on a filled cache, or chunked prefill); start from an empty DynamicCache"
            )
        run.layout = self.layouts.get(cache)
        if run.layout is None:
            run.mode = "passthrough"  # a cache filled without compression
            return
        if hidden.shape[1] != 1:
            raise ValueError(
                f"a compressed cache is extended one token per step; got {hidden.shape[1]} new tokens (chunked "
                "prefill, assisted decoding or a multi-turn continuation are not supported)"
            )
        run.mode = "decode"

    def _capture_hook(self, index: int):
        def capture(query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
            run = self.run
            if run is not None and run.mode == "prefill":
                seq = query.shape[2]
                run.captured[index] = (query, key[:, :, -seq:], scaling)

        return capture

    def _layer_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: object) -> object:
            run = self.run
            if run is None or run.mode != "prefill":
                return None
            query, key, scaling = run.captured.pop(index)
            if not any(run.spans):
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            query = query if scaling == query.shape[-1] ** -0.5 else query * (scaling * query.shape[-1] ** 0.5)
            _synchronize(hidden)
            tick = time.perf_counter()
            if self.evicting:
                run.observations.append(self.method.observe(index, query, key, run.spans, attention_mask=run.real))
                _synchronize(hidden)
                run.reduce_seconds += time.perf_counter() - tick
                return None
            result = self.method.reduce(
                index,
                hidden,
                query,
                key,
                run.spans,
                position_ids=run.positions,
                attention_mask=run.real,
                padding_side="left",
            )
            _synchronize(hidden)
            run.reduce_seconds += time.perf_counter() - tick
            kept = result.kept_padded.to(hidden.device)
            previous = run.columns if run.columns is not None else _identity_columns(run.real)
            run.columns = torch.where(kept >= 0, previous.gather(1, kept.clamp(min=0)), -1)
            run.is_vision = run.is_vision.gather(1, kept.clamp(min=0)) & (kept >= 0)
            run.real = kept >= 0
            run.positions = result.positions.to(hidden.device)
            run.spans = result.spans
            run.swapped = None
            run.groups.append((index + 1, run.columns))
            return (result.hidden, *output[1:]) if isinstance(output, tuple) else result.hidden

        return hook


def _cache_argument(arguments: dict) -> Cache | None:
    """The KV cache a forward was given: ``cache`` since transformers 5.24, ``past_key_values`` before (and still
    accepted, with a deprecation warning, by 5.24's forwards), directly or inside a bound ``**kwargs``."""
    extra = arguments.get("kwargs") or {}
    for name in ("cache", "past_key_values"):
        for source in (arguments, extra):
            if source.get(name) is not None:
                return source[name]
    return None


def _identity_columns(real: torch.Tensor) -> torch.Tensor:
    columns = torch.arange(real.shape[1], device=real.device).expand(real.shape[0], -1)
    return torch.where(real, columns, -1)


def _synchronize(tensor: torch.Tensor) -> None:
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def _allowed_and_masked(mask: torch.Tensor) -> tuple[object, object]:
    """The values that let a query see a key, and that hide it, in a bool or additive float mask."""
    if mask.dtype == torch.bool:
        return True, False
    return 0.0, torch.finfo(mask.dtype).min


def _gather_prefill_inputs(originals: dict, columns: torch.Tensor) -> dict:
    """Layer 0's mask, rotary tables and position ids at the surviving prefill indices ``columns``
    ``(B, S')`` (``-1``: a dead slot)."""
    batch, length = columns.shape
    alive = columns >= 0
    index = columns.clamp(min=0)
    cos, sin = originals["position_embeddings"]
    # (B or 1, S, d), or (3, B, S, d) where Qwen2-VL applies its M-RoPE sections inside attention (transformers < 5.17)
    swapped = {
        "position_embeddings": tuple(
            table.expand(*table.shape[:-3], batch, -1, -1).gather(
                -2, index[..., None].expand(*table.shape[:-3], batch, length, table.shape[-1])
            )
            for table in (cos, sin)
        )
    }
    position_ids = originals["position_ids"]
    if position_ids is not None:
        swapped["position_ids"] = position_ids.expand(*position_ids.shape[:-2], batch, -1).gather(
            -1, index.expand(*position_ids.shape[:-2], batch, length)
        )
    mask = originals["attention_mask"]
    dead_rows = ~alive[:, None, :, None] & torch.eye(length, dtype=torch.bool, device=columns.device)
    if mask is None:
        if bool(alive.all()):
            swapped["attention_mask"] = None
            return swapped
        causal = torch.ones(length, length, dtype=torch.bool, device=columns.device).tril()
        swapped["attention_mask"] = (causal & alive[:, None, None, :]) | dead_rows
        return swapped
    allowed, masked = _allowed_and_masked(mask)
    full = mask.expand(batch, -1, -1, -1)
    rows = full.gather(2, index[:, None, :, None].expand(-1, full.shape[1], -1, full.shape[3]))
    gathered = rows.gather(3, index[:, None, None, :].expand(-1, full.shape[1], length, -1))
    gathered = gathered.masked_fill(~alive[:, None, None, :], masked).masked_fill(dead_rows, allowed)
    swapped["attention_mask"] = gathered
    return swapped


def _gather_decode_mask(
    mask: torch.Tensor | None, columns: torch.Tensor, prefill_length: int, full_length: int
) -> torch.Tensor | None:
    """The decode mask of a shortened layer: the uncompressed mask ``(B, 1, 1, full_length)`` (or ``None``)
    at the columns the layer holds, its prefill survivors ``columns`` ``(B, L)`` (``-1``: dead) then every
    decoded token. The stock mask is sized to layer 0; where layer 0 is itself compacted (post-prefill
    eviction) it does not cover the full length, and the mask is built from the held slots alone (a
    decoded token sees every real prompt token the layer holds)."""
    batch = columns.shape[0]
    decoded = torch.arange(prefill_length, full_length, device=columns.device).expand(batch, -1)
    held = torch.cat([columns, decoded], dim=1)
    alive = held >= 0
    if mask is None or mask.shape[-1] != full_length:
        if mask is None or mask.dtype == torch.bool:
            return None if mask is None and bool(alive.all()) else alive[:, None, None, :]
        _, masked = _allowed_and_masked(mask)
        return torch.zeros(alive.shape, dtype=mask.dtype, device=mask.device).masked_fill(~alive, masked)[:, None, None]
    _, masked = _allowed_and_masked(mask)
    full = mask.expand(batch, -1, -1, -1)
    gathered = full.gather(3, held.clamp(min=0)[:, None, None, :].expand(-1, full.shape[1], full.shape[2], -1))
    return gathered.masked_fill(~alive[:, None, None, :], masked)


def _check_cache_length(cache: Cache, index: int, columns: torch.Tensor, decoded: int) -> None:
    """Check that layer ``index`` holds its prefill survivors plus one slot per earlier decoded token."""
    held = cache.layers[index].get_seq_length()
    expected = columns.shape[1] + decoded
    if held != expected:
        raise RuntimeError(
            f"layer {index} of the compressed KV cache holds {held} slots, lightkv expected {expected}: the cache "
            "was changed outside lightkv (cropped, reordered or reused for another prompt)"
        )
