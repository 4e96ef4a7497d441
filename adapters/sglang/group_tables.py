"""Pointing SGLang's attention backends at a layer group's request-to-token table: :class:`GroupTable`,
:func:`point_at_table` and :func:`use_table` (README, SGLang: "What it does").
"""

from __future__ import annotations

import copy

import torch

#: Attribute of SGLang's Triton attention backend keeping its own KV index translator while a group's is in place.
_STOCK_TRANSLATOR = "lightkv_stock_translator"


class GroupTable:
    """A request-to-token pool as an attention backend reads it, with a group's own table."""

    def __init__(self, pool: object, req_to_token: torch.Tensor) -> None:
        self._pool = pool
        self.req_to_token = req_to_token

    def __getattr__(self, name: str) -> object:
        return getattr(self._pool, name)


def point_at_table(backend: object, pool: object) -> None:
    """Make the attention backend read request-to-token rows from ``pool`` (a :class:`GroupTable`, or the stock
    pool back).

    Raises:
        NotImplementedError for a backend other than ``torch_native`` and ``triton``.
    """
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    if isinstance(backend, TorchNativeAttnBackend):
        backend.req_to_token_pool = pool
        return
    if not isinstance(backend, TritonAttnBackend):
        raise NotImplementedError(
            f"lightkv layer groups support the torch_native and triton attention backends, not {type(backend).__name__}"
        )
    backend.req_to_token_pool = pool
    backend.req_to_token = pool.req_to_token
    # the backend gathers KV indices through the runner's index translator, which reads its own table
    stock = backend.__dict__.setdefault(_STOCK_TRANSLATOR, backend.kv_index_translator)
    translator = stock
    if pool.req_to_token is not stock.req_to_token:
        translator = copy.copy(stock)
        translator.req_to_token = pool.req_to_token
    backend.kv_index_translator = translator


def use_table(backend: object, pool: object, view: object) -> None:
    """:func:`point_at_table`, then rebuild the backend's eager metadata for the layers that get ``view`` (a
    ``ForwardBatch``)."""
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    point_at_table(backend, pool)
    if isinstance(backend, TritonAttnBackend):
        backend.init_forward_metadata(view)
