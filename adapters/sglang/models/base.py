"""What the four model classes share: building the method from the server's ``--kv-compress`` settings,
installing :class:`~lightkv_adapters.sglang.models.grouped.LayerGroups` on the text model, and taking logits
on the last group's view."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lightkv_adapters.sglang.models.grouped import LayerGroups
from lightkv_adapters.sglang.settings import KVCompressSettings, settings_of


def server_settings() -> KVCompressSettings:
    """The settings of the server this process belongs to (``none`` outside a server, e.g. in a unit test
    that builds a model without publishing server arguments)."""
    from sglang.srt.runtime_context import get_server_args

    try:
        server_args = get_server_args()
    except (AttributeError, RuntimeError, ValueError):
        return KVCompressSettings()
    return settings_of(server_args)


class _GroupedTextModel:
    """Mixed into the text model's class: its forward runs :meth:`LayerGroups.forward`."""

    lightkv_groups: LayerGroups

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        forward_batch: object,
        input_embeds: torch.Tensor | None = None,
        pp_proxy_tensors: object | None = None,
    ) -> torch.Tensor:
        if pp_proxy_tensors is not None or getattr(self, "layers_to_capture", None):
            raise NotImplementedError("lightkv does not support pipeline parallelism or auxiliary hidden states")
        return self.lightkv_groups.forward(self, input_ids, positions, forward_batch, input_embeds)


class _LastGroupLogits(nn.Module):
    """SGLang's logits processor, fed the view of the last layer group (the tokens the hidden states hold)."""

    def __init__(self, inner: nn.Module, groups: LayerGroups) -> None:
        super().__init__()
        self.inner = inner
        self.groups = groups

    def forward(self, input_ids, hidden_states, lm_head, forward_batch, *args, **kwargs):
        view, self.groups.final_batch = self.groups.final_batch, None
        if view is not None:
            input_ids, forward_batch = view.input_ids, view
        return self.inner(input_ids, hidden_states, lm_head, forward_batch, *args, **kwargs)


def install(
    owner: nn.Module,
    text_attribute: str,
    logits_owner: nn.Module,
    preset: str,
    spans_of: Callable[[object, int], list],
) -> LayerGroups | None:
    """Install the server's method on ``owner.<text_attribute>`` (SGLang's ``Qwen2Model``/``LlamaModel``).

    Args:
        owner: the module holding the text model.
        text_attribute: the text model's attribute name on ``owner``.
        logits_owner: the module whose ``logits_processor`` turns the text model's output into logits.
        preset: the family's released schedule (a key of :data:`lightkv_core.config.PRESETS`).
        spans_of: ``spans_of(mm_inputs, seq_len)`` lists one request's vision spans (prompt token indices) from its
            SGLang multimodal inputs.

    Returns:
        The text model's :class:`LayerGroups`, or ``None`` under ``--kv-compress none`` (the model is stock).
    """
    text_model = getattr(owner, text_attribute)
    method = server_settings().reduction(preset, len(text_model.layers))
    if method is None:
        return None
    stock = type(text_model)
    text_model.__class__ = type(f"LightKV{stock.__name__}", (_GroupedTextModel, stock), {})
    groups = LayerGroups(text_model, method, spans_of)
    text_model.lightkv_groups = groups
    logits_owner.logits_processor = _LastGroupLogits(logits_owner.logits_processor, groups)
    return groups


def capture_spans(groups: LayerGroups | None, forward_batch: object) -> None:
    """Record each request's vision spans (``groups.spans_of``) before SGLang's multimodal embedding clears
    ``mm_inputs``; requests without multimodal inputs get none."""
    if groups is None or not forward_batch.forward_mode.is_extend():
        return
    mm_inputs = forward_batch.mm_inputs or [None] * forward_batch.batch_size
    groups.spans = [
        [] if inputs is None else groups.spans_of(inputs, int(length))
        for inputs, length in zip(mm_inputs, forward_batch.extend_seq_lens_cpu, strict=True)
    ]
