"""The hooks that run a compression method inside a stock transformers model (:class:`ModelHooks`; applied by
:mod:`lightkv_adapters.hf.apply`).

At layer 0 of every forward of the text model they decide between a prefill (empty cache, or none), a decode step
on a compressed cache, and a forward they leave alone (:meth:`ModelHooks._start`). What the hooks do in each, and
the limits: README, "Transformers".
"""

from __future__ import annotations

import inspect
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from lightkv_adapters.hf import attention
from lightkv_adapters.hf.families import Family
from lightkv_adapters.hf.images import GridRecorder, check_unpatched
from lightkv_adapters.hf.masks import (
    CacheLayout,
    cache_argument,
    check_cache_length,
    gather_decode_mask,
    gather_prefill_inputs,
)
from lightkv_adapters.hf.prompt import PromptLayout, read_prompt
from lightkv_core.methods import CompressionMethod, KVEviction
from lightkv_core.prefill import PrefillTracker, at_default_scale, kv_bytes_per_token_layer, synchronized_clock
from lightkv_core.spans import VisionSpan


@dataclass
class _Run:
    """State of one forward of the text model."""

    spans: list[list[VisionSpan]] | None  # None: not known (no input_ids)
    real: torch.Tensor | None  # (B, S) the prompt's real tokens; None for a prepared 4D mask
    prompt: PromptLayout
    mode: str = ""  # "prefill", "decode" or "passthrough", set at layer 0
    cache: Cache | None = None
    layout: CacheLayout | None = None
    prefill: PrefillTracker | None = None  # the survivors and counts of a prefill
    positions: torch.Tensor | None = None  # (B, S') ordinal positions handed to the method
    prefill_length: int = 0
    dtype: torch.dtype = torch.float32
    originals: dict = field(default_factory=dict)  # layer 0's attention_mask / position_embeddings / position_ids
    swapped: dict | None = None  # the gathered ones for the current group of layers
    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    captured: dict = field(default_factory=dict)
    observations: list[torch.Tensor] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


class ModelHooks:
    """lightkv on one model: its hooks, its method, the layout of every compressed cache.

    :meth:`check` first, then :meth:`attach`; :meth:`detach` undoes :meth:`attach` (``lightkv_adapters.hf.apply``
    drives them).
    """

    def __init__(self, model: nn.Module, family: Family, text_model: nn.Module, method: CompressionMethod) -> None:
        self.model, self.family, self.text_model, self.method = model, family, text_model, method
        self.layers: Sequence[nn.Module] = text_model.layers
        self.evicting = isinstance(method, KVEviction)
        self.reduce_layers = set(range(len(self.layers))) if self.evicting else set(method.reduce_layers)
        self.layouts: weakref.WeakKeyDictionary[Cache, CacheLayout] = weakref.WeakKeyDictionary()
        self.prompt: PromptLayout | None = None
        self.run: _Run | None = None
        self.multimodal_signature = inspect.signature(model.model.forward)
        self.top_signature = inspect.signature(model.forward)
        self.attention_modules = [layer.self_attn for layer in self.layers]
        self.recorder: GridRecorder | None = None
        self.handles: list = []

    def check(self) -> None:
        """Every check :meth:`attach` needs, changing nothing."""
        attention.check_implementations(self.attention_modules)
        check_unpatched(self.model.model, self.family.grid_arguments)

    def attach(self) -> None:
        self.recorder = GridRecorder(self.model.model, self.family.grid_arguments)
        attention.use_wrappers(self.attention_modules)
        model, text_model = self.model, self.text_model
        self.handles = [
            model.register_forward_pre_hook(self._before_model, with_kwargs=True),
            model.model.register_forward_pre_hook(self._before_multimodal, with_kwargs=True),
            text_model.register_forward_pre_hook(self._before_text, with_kwargs=True),
            text_model.register_forward_hook(self._after_text),
        ]
        for index, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._layer_pre_hook(index), with_kwargs=True))
            if index in self.reduce_layers:
                self.handles.append(layer.register_forward_hook(self._layer_hook(index)))
                attention.capture_from(layer.self_attn, self._capture_hook(index))
        model.lightkv_stats = None
        model.lightkv_method = self.method

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        for index in self.reduce_layers:
            attention.stop_capture(self.layers[index].self_attn)
        attention.restore(self.attention_modules)
        if self.recorder is not None:
            self.recorder.remove()
        for name in ("lightkv_stats", "lightkv_method"):
            vars(self.model).pop(name, None)

    # --- model-level hooks -------------------------------------------------------------------------

    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.top_signature.bind_partial(*args, **kwargs).arguments.get("labels") is not None:
            raise ValueError(
                "lightkv shortens the sequence in prefill, so logits no longer line up with labels; "
                "compute losses without lightkv (remove_lightkv(model))"
            )

    def _before_multimodal(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs = self.multimodal_signature.bind_partial(*args, **kwargs).arguments
        cache = cache_argument(inputs)
        prefill = cache is None or cache.get_seq_length() == 0
        self.prompt = read_prompt(self.model, self.family, self.recorder, inputs, prefill)

    def _before_text(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        prompt, self.prompt = self.prompt, None
        if prompt is not None and prompt.error is not None:
            raise prompt.error
        embeds = kwargs.get("inputs_embeds")
        batch, seq = embeds.shape[:2] if embeds is not None else kwargs["input_ids"].shape
        mask = kwargs.get("attention_mask")
        if mask is None:
            real = torch.ones(batch, seq, dtype=torch.bool)
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
            real = mask[:, -seq:].to(torch.bool)
        else:
            real = None  # a prepared 4D mask or mask mapping: refused below if a prefill needs it
        if prompt is None:
            prompt = PromptLayout(None, False)
        if (prompt.spans is not None and len(prompt.spans) != batch) or (
            real is not None and real.shape != (batch, seq)
        ):
            raise ValueError("the vision spans and attention mask do not match the text model's input")
        self.run = _Run(spans=prompt.spans, real=real, prompt=prompt)

    def _after_text(self, module: nn.Module, args: tuple, output: object) -> None:
        run, self.run = self.run, None
        if run is not None and run.mode == "decode":
            run.layout.decoded += 1
        if run is None or run.mode != "prefill":
            return
        if self.evicting and run.cache is not None and any(run.prefill.spans):
            self._evict(run)
        if run.cache is not None and run.groups:
            columns = [None] * len(self.layers)
            for first, group_columns in run.groups:
                columns[first:] = [group_columns] * (len(self.layers) - first)
            self.layouts[run.cache] = CacheLayout(run.prefill_length, columns)
        config = self.text_model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.model.lightkv_stats = run.prefill.stats(
            kv_bytes_per_token_layer(config.num_key_value_heads, head_dim, run.dtype),
            synchronized_clock(run.prefill.real),
            run.prompt.images_left_alone,
        )

    def _evict(self, run: _Run) -> None:
        """Replace every layer's prefill cache by the method's compacted one; record the layout and counts."""
        layers = run.cache.layers
        with run.prefill.reducing(layers[0].keys):
            evictions = self.method.evict(
                run.observations,
                [layer.keys for layer in layers],
                [layer.values for layer in layers],
                run.prefill.spans,
                attention_mask=run.prefill.real,
            )
        for index, evicted in enumerate(evictions):
            layers[index].keys, layers[index].values = evicted.keys, evicted.values
            run.groups.append((index, run.prefill.evicted(index, evicted.slots[:, 0])))

    # --- layer hooks --------------------------------------------------------------------------------

    def _layer_pre_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            run = self.run
            if run is None:
                return None
            if index == 0:
                self._start(run, args[0] if args else kwargs["hidden_states"], kwargs)
            if run.mode == "prefill":
                run.prefill.layer()
                if not run.groups:
                    return None
                if run.swapped is None:
                    run.swapped = gather_prefill_inputs(run.originals, run.prefill.columns)
                return args, {**kwargs, **run.swapped}
            if run.mode == "decode":
                columns = run.layout.columns[index]
                if columns is None:
                    return None
                check_cache_length(run.cache, index, columns, run.layout.decoded)
                prefill_length = run.layout.prefill_length
                full_length = prefill_length + run.layout.decoded + 1
                mask = gather_decode_mask(kwargs.get("attention_mask"), columns, prefill_length, full_length)
                return args, {**kwargs, "attention_mask": mask}
            return None

        return hook

    def _start(self, run: _Run, hidden: torch.Tensor, kwargs: dict) -> None:
        """Decide at layer 0 whether this forward is a prefill, a decode step on a compressed cache, or
        untouched."""
        cache = cache_argument(kwargs)
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
            if run.spans is None:
                if run.prompt.brings_images:
                    raise ValueError(
                        "lightkv finds the image tokens through input_ids: pass input_ids, not inputs_embeds"
                    )
                run.spans = [[] for _ in range(hidden.shape[0])]
            run.mode = "prefill"
            run.prefill = PrefillTracker(run.spans, run.real.to(hidden.device), run.started)
            run.positions = (run.prefill.real.long().cumsum(dim=1) - 1).clamp(min=0)
            run.originals = {
                "attention_mask": kwargs.get("attention_mask"),
                "position_embeddings": kwargs.get("position_embeddings"),
                "position_ids": kwargs.get("position_ids"),
            }
            run.prefill_length, run.dtype = hidden.shape[1], hidden.dtype
            return
        if run.prompt.brings_images:
            raise ValueError(
                "lightkv compresses images in the prefill only: this forward brings images to a non-empty "
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
            if index not in run.captured:
                raise NotImplementedError(
                    f"layer {index} attended with {attention.implementation_of(module.self_attn)!r}, which lightkv "
                    "does not wrap: keep the model on 'sdpa' or 'eager' while lightkv is applied"
                )
            query, key, scaling = run.captured.pop(index)
            prefill = run.prefill
            if not any(prefill.spans):
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            query = at_default_scale(query, scaling)
            if self.evicting:
                with prefill.reducing(hidden):
                    observation = self.method.observe(index, query, key, prefill.spans, attention_mask=prefill.real)
                run.observations.append(observation)
                return None
            with prefill.reducing(hidden):
                result = self.method.reduce(
                    index,
                    hidden,
                    query,
                    key,
                    prefill.spans,
                    position_ids=run.positions,
                    attention_mask=prefill.real,
                    padding_side=run.prompt.padding_side,
                )
            prefill.reduced(result, index, self.method.skip_reason)
            if result.hidden is hidden:  # nothing removed: later layers run as stock
                return None
            run.positions = result.positions.to(hidden.device)
            run.swapped = None
            run.groups.append((index + 1, prefill.columns))
            return (result.hidden, *output[1:]) if isinstance(output, tuple) else result.hidden

        return hook
