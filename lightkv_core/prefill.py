"""The per-stage bookkeeping of a compressed prefill, shared by every adapter (HF hooks, SGLang, the reference
decoder): queries at the default scale, which prefill token every current slot holds, per-layer KV counts and
:class:`~lightkv_core.stats.PrefillStats`, and timing that waits for the device.

An adapter runs its layers and calls, in order: :class:`PrefillTracker` at the start, :meth:`~PrefillTracker.layer`
after each layer caches its KV, :meth:`~PrefillTracker.reduced` after an in-prefill method shortened the sequence
(or :meth:`~PrefillTracker.evicted` per layer after a post-prefill eviction), and :meth:`~PrefillTracker.stats`.
The counts stay on the device and method time is taken with CUDA events, so the bookkeeping never waits for the
device until :meth:`~PrefillTracker.stats` reads everything back at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

from lightkv_core.compaction import StageResult
from lightkv_core.spans import VisionSpan, vision_token_mask
from lightkv_core.stats import PrefillStats, StageReport


def synchronized_clock(tensor: torch.Tensor) -> float:
    """``time.perf_counter()`` once the work queued on ``tensor``'s device is done (CUDA runs asynchronously)."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    return time.perf_counter()


def at_default_scale(query: torch.Tensor, scaling: float) -> torch.Tensor:
    """``query`` ``(..., d)`` rescaled so that the methods' default logit scale ``d ** -0.5`` gives the logits the
    model computes with ``scaling`` (the methods score with the default scale)."""
    head_dim = query.shape[-1]
    return query if scaling == head_dim**-0.5 else query * (scaling * head_dim**0.5)


def kv_bytes_per_token_layer(kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """KV bytes one token costs in one layer: keys and values of ``kv_heads`` heads of ``head_dim`` values."""
    return 2 * kv_heads * head_dim * (torch.finfo(dtype).bits // 8)


def survivor_columns(previous: torch.Tensor, kept_padded: torch.Tensor) -> torch.Tensor:
    """``(B, S')`` values of ``previous`` ``(B, S)`` at each output slot's input index ``kept_padded`` (a stage
    result's), ``-1`` where the slot is padding."""
    kept = kept_padded.to(previous.device)
    return torch.where(kept >= 0, previous.gather(1, kept.clamp(min=0)), -1)


class PrefillTracker:
    """One prefill's state from stage to stage, and its accounting.

    Args:
        spans: one list of vision spans per sample, in the prompt.
        real: ``(B, S)`` bool real tokens of the prompt.
        started: when the prefill started (:func:`synchronized_clock`).

    Attributes (current, after the stages so far): ``spans``; ``real`` ``(B, S')``; ``columns`` ``(B, S')``
    int64 prompt index of every slot (``-1``: padding or a dead slot); ``is_vision`` ``(B, S')``;
    ``kv_tokens`` / ``vision_tokens`` one ``(B,)`` count per layer recorded (on the device).
    """

    def __init__(self, spans: Sequence[Sequence[VisionSpan]], real: torch.Tensor, started: float) -> None:
        self.spans = [list(sample) for sample in spans]
        self.real = real
        columns = torch.arange(real.shape[1], device=real.device).expand(real.shape[0], -1)
        self.columns = torch.where(real, columns, -1)
        self.is_vision = vision_token_mask(self.spans, real.shape[1], real.device)
        self.original_tokens = real.sum(dim=1)
        self.original_vision_tokens = (self.is_vision & real).sum(dim=1)
        self.started = started
        self._host_seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.kv_tokens: list[torch.Tensor] = []
        self.vision_tokens: list[torch.Tensor] = []
        self.prompt_is_vision = self.is_vision
        self.stages: list[StageReport] = []

    @contextmanager
    def reducing(self, tensor: torch.Tensor) -> Iterator[None]:
        """Time the block as method time: with CUDA events on the current stream of ``tensor``'s device (read in
        :meth:`stats`, no wait here), or the host clock elsewhere."""
        if tensor.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((start, end))
            return
        tick = time.perf_counter()
        try:
            yield
        finally:
            self._host_seconds += time.perf_counter() - tick

    @property
    def reduce_seconds(self) -> float:
        """Method time so far (waits for the device when there are CUDA events to read)."""
        if self._events:
            self._events[-1][1].synchronize()
        return self._host_seconds + sum(start.elapsed_time(end) for start, end in self._events) / 1000.0

    def layer(self) -> None:
        """Count what the next layer caches: the current real and vision tokens."""
        self.kv_tokens.append(self.real.sum(dim=1))
        self.vision_tokens.append((self.is_vision & self.real).sum(dim=1))

    def reduced(self, result: StageResult, layer: int, skip_reason: Callable[[int, Sequence[VisionSpan]], str]) -> None:
        """Follow the survivors of the in-prefill stage on layer ``layer`` (``result.kept_padded``) and report it
        (:class:`~lightkv_core.stats.StageReport`, from the spans on the host); ``skip_reason(layer, spans)`` says
        why the stage removed no vision token of a sample with ``spans`` (the method's
        :meth:`~lightkv_core.methods.PrefillReduction.skip_reason`)."""
        before = [sum(span.length for span in sample) for sample in self.spans]
        after = [sum(span.length for span in sample) for sample in result.spans]
        skipped = tuple(
            None if kept < entered else skip_reason(layer, sample)
            for kept, entered, sample in zip(after, before, self.spans, strict=True)
        )
        self.stages.append(StageReport(layer, tuple(before), tuple(after), skipped))
        kept = result.kept_padded.to(self.real.device)
        alive = kept >= 0
        self.columns = survivor_columns(self.columns, kept)
        self.is_vision = self.is_vision.gather(1, kept.clamp(min=0)) & alive
        self.real = alive
        self.spans = result.spans

    def evicted(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """Recount layer ``layer`` after a post-prefill eviction left it holding ``slots`` ``(B, L)`` (prompt index
        of each slot in head 0, ``-1`` dead); returns the slots on the tracker's device."""
        slots = slots.to(self.real.device)
        alive = slots >= 0
        self.kv_tokens[layer] = alive.sum(dim=1)
        self.vision_tokens[layer] = (self.prompt_is_vision.gather(1, slots.clamp(min=0)) & alive).sum(dim=1)
        return slots

    def stats(
        self, bytes_per_token_layer: int, finished: float, images_left_alone: Sequence[Sequence[str]] = ()
    ) -> PrefillStats:
        """The prefill's :class:`PrefillStats` (host tensors, read back in one copy), the prefill having finished at
        ``finished``; ``images_left_alone``: per sample, the adapter's notes on images it kept from the method."""
        layers = len(self.kv_tokens)
        counts = torch.stack([*self.kv_tokens, *self.vision_tokens, self.original_tokens, self.original_vision_tokens])
        counts = counts.cpu()
        return PrefillStats(
            kv_tokens=counts[:layers],
            vision_tokens=counts[layers : 2 * layers],
            original_tokens=counts[2 * layers],
            original_vision_tokens=counts[2 * layers + 1],
            reduce_seconds=self.reduce_seconds,
            prefill_seconds=finished - self.started,
            bytes_per_token_layer=bytes_per_token_layer,
            stages=tuple(self.stages),
            images_left_alone=tuple(tuple(notes) for notes in images_left_alone),
        )
