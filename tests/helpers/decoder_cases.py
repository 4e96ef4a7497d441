"""Inputs and small drivers for the reference decoder's tests (``lightkv_adapters.reference.decoder``).

A tiny float32 :class:`Decoder` configuration, prompts of random text embeddings with an optional square image,
left-padded batches of them, a prefill with a fresh cache, and the rounding chain a logit of the decoder
accumulates (for :func:`helpers.tolerances.assert_close_rounding`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from helpers.tolerances import decoder_chain
from lightkv_adapters.reference.decoder import Decoder, DecoderConfig, LayerwiseKVCache
from lightkv_core import LightKVConfig
from lightkv_core.methods import LightKV

CONFIG = DecoderConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2)
"""The configuration of the tests' shared decoder (the ``decoder`` fixture of ``tests/adapters/conftest.py``)."""


def chain_of(model: Decoder, keys: int) -> int:
    """Rounded operations from the embeddings to a logit of ``model`` attending over ``keys`` tokens."""
    config = model.config
    head_dim = config.hidden_size // config.num_heads
    return decoder_chain(config.num_layers, config.hidden_size, config.intermediate_size, head_dim, keys)


@dataclass
class DecoderSample:
    """One prompt: ``embeds`` ``(S, D)`` and its vision spans ``(start, end, rows, cols)``."""

    embeds: torch.Tensor
    spans: list[tuple[int, int, int, int]]

    @property
    def length(self) -> int:
        return self.embeds.shape[0]


def make_sample(model: Decoder, seed: int, before: int, side: int | None, after: int) -> DecoderSample:
    """``before`` text tokens, an optional ``side x side`` image (random embeddings), ``after`` text tokens."""
    generator = torch.Generator().manual_seed(seed)
    dim = model.config.hidden_size
    with torch.no_grad():
        ids = torch.randint(0, model.config.vocab_size, (before + after,), generator=generator)
        text = model.model.embed_tokens(ids)
    if side is None:
        return DecoderSample(text, [])
    image = torch.randn(side * side, dim, generator=generator)
    embeds = torch.cat([text[:before], image, text[before:]])
    return DecoderSample(embeds, [(before, before + side * side, side, side)])


def left_pad(
    samples: list[DecoderSample],
) -> tuple[torch.Tensor, torch.Tensor, list[list[tuple[int, int, int, int]]]]:
    """``(embeds (B, S, D), mask (B, S) bool, spans)`` of the samples, left-padded with zero rows."""
    width = max(s.length for s in samples)
    dim = samples[0].embeds.shape[1]
    embeds = torch.zeros(len(samples), width, dim)
    mask = torch.zeros(len(samples), width, dtype=torch.bool)
    spans = []
    for b, sample in enumerate(samples):
        pad = width - sample.length
        embeds[b, pad:] = sample.embeds
        mask[b, pad:] = True
        spans.append([(start + pad, end + pad, rows, cols) for start, end, rows, cols in sample.spans])
    return embeds, mask, spans


def prefill(model: Decoder, embeds, mask=None, spans=None, reduction=None):
    """``(logits, stats, cache)`` of a prefill with a fresh cache."""
    cache = LayerwiseKVCache.empty(model.config.num_layers)
    with torch.no_grad():
        logits, stats = model(embeds, attention_mask=mask, spans=spans, cache=cache, reduction=reduction)
    return logits, stats, cache


def lightkv(layers, windows, ratios, **options) -> LightKV:
    """A LightKV method with the PyTorch backend for the schedule ``layers``, ``windows``, ``ratios``."""
    return LightKV(LightKVConfig(tuple(layers), tuple(windows), tuple(ratios), **options), backend="torch")
