"""A minimal Llama-style decoder with in-prefill token reduction: the example custom engines copy.

Plain PyTorch, with Hugging Face ``LlamaForCausalLM``'s parameter names (``model.layers.0.self_attn.q_proj.weight``,
``lm_head.weight``, ...). What is specific to KV compression is marked ``COMPRESSION HOOK``; README, "The reference
decoder and the tiny LVLM".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightkv_core.methods import CompressionMethod, KVEviction
from lightkv_core.prefill import PrefillTracker, kv_bytes_per_token_layer, synchronized_clock
from lightkv_core.spans import check_tokens
from lightkv_core.stats import PrefillStats


@dataclass(frozen=True)
class DecoderConfig:
    """Shape of a Llama-style decoder.

    Attributes:
        vocab_size: tokens in the vocabulary.
        hidden_size: model width ``D``.
        intermediate_size: SwiGLU inner width.
        num_layers: decoder layers.
        num_heads: query heads ``H``; ``head_dim = hidden_size // num_heads``.
        num_kv_heads: key/value heads ``Hk`` (``H % Hk == 0``).
        rope_theta: rotary base.
        rms_norm_eps: RMSNorm epsilon.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotary_tables(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple:
    """``(cos, sin)``, each ``(B, S, head_dim)``, for ``(B, S)`` integer position ids."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq.to(position_ids.device)
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, heads, S, d)`` by the tables ``(B, S, d)``."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


@dataclass
class LayerCache:
    """One layer's KV cache. ``keys``/``values``: ``(B, Hk, L, d)``; ``valid``: ``(B, L)`` bool (False on
    padding); ``next_position``: ``(B,)`` rotary position of the next token in this layer."""

    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    next_position: torch.Tensor

    @property
    def length(self) -> int:
        """Slots held (padding included)."""
        return self.keys.shape[2]


@dataclass
class LayerwiseKVCache:
    """Per-layer caches whose lengths may differ (layers after a reduction hold fewer tokens)."""

    layers: list[LayerCache | None]

    @classmethod
    def empty(cls, num_layers: int) -> LayerwiseKVCache:
        return cls([None] * num_layers)

    @property
    def is_empty(self) -> bool:
        return all(layer is None for layer in self.layers)

    def valid_tokens(self) -> torch.Tensor:
        """``(num_layers, B)`` real tokens held per layer and sample."""
        return torch.stack([layer.valid.sum(dim=1) for layer in self.layers])


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        d = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * d, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_heads * d, config.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, cache: LayerCache | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(output, q, k, keys, values)``: ``q``/``k`` post-RoPE for the new tokens; ``keys``/``values``
        the full layer cache including them. ``mask``: ``(B, 1, S, L)`` bool or ``None`` (causal)."""
        batch, seq, _ = x.shape
        c = self.config
        q = self.q_proj(x).view(batch, seq, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, c.num_kv_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        keys = k if cache is None else torch.cat([cache.keys, k], dim=2)
        values = v if cache is None else torch.cat([cache.values, v], dim=2)
        group = c.num_heads // c.num_kv_heads
        out = F.scaled_dot_product_attention(
            q,
            keys.repeat_interleave(group, dim=1),
            values.repeat_interleave(group, dim=1),
            attn_mask=mask,
            is_causal=mask is None,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1)), q, k, keys, values


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None, cache):
        attended, q, k, keys, values = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        x = x + attended
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, q, k, keys, values


class LlamaModel(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def _prefill_mask(real: torch.Tensor) -> torch.Tensor:
    """``(B, 1, S, S)`` bool: causal over real tokens; a padding query sees only itself (no NaN rows)."""
    seq = real.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=real.device).tril()
    mask = causal[None] & real[:, None, :] & real[:, :, None]
    return (mask | torch.eye(seq, dtype=torch.bool, device=real.device)[None])[:, None]


def _decode_mask(valid: torch.Tensor, new: int) -> torch.Tensor:
    """``(B, 1, new, L)`` bool: new token ``i`` sees every valid cached slot and the new tokens ``<= i``."""
    batch, length = valid.shape
    past = length - new
    slot = torch.arange(length, device=valid.device)
    visible = slot[None, :] <= past + torch.arange(new, device=valid.device)[:, None]
    return (valid[:, None, :] & visible[None])[:, None]


class Decoder(nn.Module):
    """Llama-style causal LM (``LlamaForCausalLM`` parameter names) with per-layer KV lengths."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        spans: Sequence[Sequence] | None = None,
        cache: LayerwiseKVCache | None = None,
        reduction: CompressionMethod | None = None,
        last_logits_only: bool = False,
    ) -> tuple[torch.Tensor, PrefillStats | None]:
        """Run the decoder on new tokens.

        Args:
            inputs_embeds: ``(B, S, D)`` embeddings of the new tokens.
            attention_mask: ``(B, S)`` real tokens of a prefill, padding on the left; ``None``: all
                real. In decoding (non-empty ``cache``) every new token is real.
            spans: one list of vision spans per sample (``VisionSpan`` or ``(start, end, rows, cols)``).
            cache: a :class:`LayerwiseKVCache` filled in place; ``None`` runs without one (training).
            reduction: the compression method, prefill only: an in-prefill token reduction (LightKV,
                FastV, ...; layer ``-1`` in its ``reduce_layers`` reduces the input embeddings before
                layer 0, ``q``/``k`` then ``None``, which only methods without attention such as random
                drop accept) or a post-prefill eviction (PrefixKV, AirCache, LOOK-M; needs a ``cache``).
            last_logits_only: return logits of the last slot only, ``(B, 1, V)``.

        Returns:
            ``(logits, stats)``: logits ``(B, S', V)`` float32 for the slots of the last layer (``S'``
            shorter than ``S`` after a reduction), and :class:`PrefillStats` for a prefill with a cache
            (else ``None``).
        """
        batch, seq, _ = inputs_embeds.shape
        decoding = cache is not None and not cache.is_empty
        if decoding and (reduction is not None or attention_mask is not None):
            raise ValueError("decoding appends real tokens only: pass neither attention_mask nor reduction")
        if reduction is not None and spans is None:
            raise ValueError("a reduction needs the vision spans of every sample")
        evicting = isinstance(reduction, KVEviction)
        if evicting and cache is None:
            raise ValueError(f"{type(reduction).__name__} compacts the KV cache after the prefill: pass a cache")
        if decoding:
            return self._decode(inputs_embeds, cache, last_logits_only), None

        real = torch.ones(batch, seq, dtype=torch.bool, device=inputs_embeds.device)
        if attention_mask is not None:
            real = attention_mask.to(inputs_embeds.device, torch.bool)
            if tuple(real.shape) != (batch, seq):
                raise ValueError(f"attention_mask must be ({batch}, {seq}), got {tuple(real.shape)}")
            if not bool(real[:, -1].all()):
                raise ValueError("prefill batches must be left-padded (every sample's last slot real)")
        _, per_sample, _, _ = check_tokens([[]] * batch if spans is None else spans, real, None, inputs_embeds)
        reduce_layers = set(reduction.reduce_layers) if reduction is not None and not evicting else set()
        if reduce_layers and not -1 <= min(reduce_layers) <= max(reduce_layers) < self.config.num_layers:
            raise ValueError(f"reduction layers {sorted(reduce_layers)} must lie in [-1, {self.config.num_layers})")
        # COMPRESSION HOOK: the tracker follows the survivors and counts what every layer caches
        prefill = PrefillTracker(per_sample, real, synchronized_clock(inputs_embeds))
        position_ids = (torch.cumsum(real.long(), dim=1) - 1).clamp(min=0)

        hidden = inputs_embeds
        q = k = None
        unpadded = attention_mask is None or bool(real.all())
        mask = None if unpadded else _prefill_mask(real)
        observations = []
        cos, sin = rotary_tables(position_ids, self.config.head_dim, self.config.rope_theta, hidden.dtype)
        for index in range(-1, self.config.num_layers):
            if index >= 0:
                hidden, q, k, keys, values = self.model.layers[index](hidden, cos, sin, mask, None)
                if cache is not None:
                    cache.layers[index] = LayerCache(keys, values, prefill.real, position_ids.max(dim=1).values + 1)
                prefill.layer()
                if evicting:
                    # COMPRESSION HOOK: a post-prefill method keeps a few statistics of every layer's attention
                    with prefill.reducing(hidden):
                        observations.append(reduction.observe(index, q, k, prefill.spans, attention_mask=prefill.real))
            if index in reduce_layers:
                # COMPRESSION HOOK: layer `index` has cached its full KV (index -1: the input embeddings, no
                # q/k); the method shortens the hidden states and the later layers see (and cache) only the
                # survivors, with their own positions and mask.
                with prefill.reducing(hidden):
                    result = reduction.reduce(
                        index,
                        hidden,
                        q,
                        k,
                        prefill.spans,
                        position_ids=position_ids,
                        attention_mask=prefill.real,
                        padding_side="left",
                    )
                prefill.reduced(result, index, reduction.skip_reason)
                hidden, position_ids = result.hidden, result.positions
                mask = _prefill_mask(prefill.real)
                cos, sin = rotary_tables(position_ids, self.config.head_dim, self.config.rope_theta, hidden.dtype)
        if evicting:
            # COMPRESSION HOOK: the prefill is done; every layer's cache is compacted (lengths may differ)
            layers = cache.layers
            with prefill.reducing(hidden):
                evictions = reduction.evict(
                    observations,
                    [layer.keys for layer in layers],
                    [layer.values for layer in layers],
                    prefill.spans,
                    attention_mask=prefill.real,
                )
                for index, evicted in enumerate(evictions):
                    alive = prefill.evicted(index, evicted.slots[:, 0]) >= 0
                    layers[index] = LayerCache(evicted.keys, evicted.values, alive, layers[index].next_position)
        if last_logits_only:
            hidden = hidden[:, -1:]
        logits = self.lm_head(self.model.norm(hidden)).float()
        if cache is None:
            return logits, None
        c = self.config
        return logits, prefill.stats(
            kv_bytes_per_token_layer(c.num_kv_heads, c.head_dim, hidden.dtype), synchronized_clock(logits)
        )

    def _decode(self, inputs_embeds: torch.Tensor, cache: LayerwiseKVCache, last_logits_only: bool) -> torch.Tensor:
        batch, new, _ = inputs_embeds.shape
        hidden = inputs_embeds
        steps = torch.arange(new, device=hidden.device)
        for index, layer in enumerate(self.model.layers):
            layer_cache = cache.layers[index]
            position_ids = layer_cache.next_position[:, None] + steps[None, :]
            cos, sin = rotary_tables(position_ids, self.config.head_dim, self.config.rope_theta, hidden.dtype)
            valid = torch.cat([layer_cache.valid, torch.ones(batch, new, dtype=torch.bool, device=hidden.device)], 1)
            mask = _decode_mask(valid, new)
            hidden, _, _, keys, values = layer(hidden, cos, sin, mask, layer_cache)
            cache.layers[index] = LayerCache(keys, values, valid, layer_cache.next_position + new)
        if last_logits_only:
            hidden = hidden[:, -1:]
        return self.lm_head(self.model.norm(hidden)).float()

    @torch.no_grad()
    def generate(
        self,
        inputs_embeds: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        spans: Sequence[Sequence] | None = None,
        reduction: CompressionMethod | None = None,
        max_new_tokens: int = 16,
        eos_token_id: int | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> tuple[torch.Tensor, PrefillStats | None]:
        """Greedy (``temperature == 0``) or sampled generation.

        ``use_cache=False`` recomputes the whole sequence at every step (no reduction allowed): the
        slow path the cached one is checked against.

        Returns:
            ``(tokens, stats)``: ``(B, N)`` int64 generated tokens (after a sample's ``eos_token_id``
            the row is filled with it), and the prefill's :class:`PrefillStats` (``None`` without cache).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not use_cache and reduction is not None:
            raise ValueError("use_cache=False recomputes the prompt every step; it cannot run a reduction")
        batch = inputs_embeds.shape[0]
        finished = torch.zeros(batch, dtype=torch.bool, device=inputs_embeds.device)
        tokens: list[torch.Tensor] = []
        cache = LayerwiseKVCache.empty(self.config.num_layers) if use_cache else None
        embeds, mask = inputs_embeds, attention_mask
        logits, stats = self(
            embeds, attention_mask=mask, spans=spans, cache=cache, reduction=reduction, last_logits_only=True
        )
        for step in range(max_new_tokens):
            token = _pick(logits[:, -1], temperature, top_k, generator)
            if eos_token_id is not None:
                token = torch.where(finished, eos_token_id, token)
                finished = finished | (token == eos_token_id)
            tokens.append(token)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            new_embeds = self.model.embed_tokens(token)[:, None]
            if use_cache:
                logits, _ = self(new_embeds, cache=cache, last_logits_only=True)
            else:
                embeds = torch.cat([embeds, new_embeds], dim=1)
                if mask is not None:
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                logits, _ = self(embeds, attention_mask=mask, spans=spans, last_logits_only=True)
        return torch.stack(tokens, dim=1), stats


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None):
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits / temperature
    if top_k is not None:
        threshold = torch.topk(scaled, min(top_k, scaled.shape[-1]), dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < threshold, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)
