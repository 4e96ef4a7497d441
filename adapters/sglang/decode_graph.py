"""Decode under CUDA graphs with layer groups: :class:`DecodeGraph` and the hooks (:data:`GRAPH_HOOKS`) that wire it
into SGLang's decode graph runner (README, SGLang: "CUDA-graph decode").

A captured decode graph replays fixed kernels over fixed buffers, and no Python of the model runs at a replay. So
every value a layer group's decode layers read lives in a buffer that is refilled before each replay, outside the
graph, the way SGLang refills its own inputs and its attention backend's metadata:

* each later group's ``seq_lens`` and ``out_cache_loc`` (:attr:`DecodeGraph.seq_lens`,
  :attr:`DecodeGraph.out_cache_loc`, ``(groups - 1, graph batch)``), computed by
  :meth:`~lightkv_adapters.sglang.models.grouped.LayerGroups.decode_inputs`, the code the eager decode reads them from;
* each later group's attention metadata, held by an attention backend of the group's own
  (:attr:`DecodeGraph.backends`, reading the group's request-to-token table), which SGLang's
  ``init_forward_metadata_out_graph`` fills at capture and refills before every replay.

While a decode graph is captured, each group's layers get a view of the batch over those buffers and run with the
group's backend; the views and the backend switch are Python, so they run at capture only. Padded rows of a graph
batch hold ``seq_len`` fill values and write slot 0 (every group's padding slot), as SGLang's own padded rows do.
Supported on SGLang's ``triton`` attention backend (the others have no per-group table to point at).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from sglang.srt.plugins.hook_registry import HookType

from lightkv_adapters.sglang.group_tables import GroupTable, point_at_table

if TYPE_CHECKING:
    from lightkv_adapters.sglang.models.grouped import LayerGroups

#: Attribute of the runner's main attention backend holding its :class:`DecodeGraph`.
GRAPH_ATTRIBUTE = "lightkv_decode_graph"


class DecodeGraph:
    """The layer groups' decode inputs and attention backends in fixed buffers, for SGLang's decode graphs.

    Args:
        groups: the model's layer groups.
        stock_backend: the runner's attention backend (group 0's), a ``TritonAttnBackend``.
        make_backend: a new attention backend of the same kind (one per later group is made by :meth:`init_state`).
    """

    def __init__(self, groups: LayerGroups, stock_backend: object, make_backend: Callable[[], object]) -> None:
        self.groups = groups
        self.stock_backend = stock_backend
        self.make_backend = make_backend
        #: per group after the first, an attention backend reading the group's table (made by :meth:`init_state`)
        self.backends: list[object] = []
        #: ``(groups - 1, max_bs)`` each group's lengths of the graph batch's rows
        self.seq_lens: torch.Tensor | None = None
        #: ``(groups - 1, max_tokens)`` each group's slot of each row's new token
        self.out_cache_loc: torch.Tensor | None = None
        #: the pools' per-group lengths of every request-pool row, copied to the device before each replay
        self.lengths: torch.Tensor | None = None

    @property
    def ready(self) -> bool:
        """Whether :meth:`init_state` has run (a graph can be captured)."""
        return self.seq_lens is not None

    def init_state(self, max_bs: int, max_num_tokens: int) -> None:
        """Allocate the buffers for graphs of up to ``max_bs`` requests (``max_num_tokens`` tokens), and one
        attention backend per later group with its own graph state, pointed at the group's table."""
        pool = self.stock_backend.req_to_token_pool
        self.groups.ensure_tables(pool)
        device = self.groups.tables[0].device
        self.backends = []
        for table in self.groups.tables:
            backend = self.make_backend()
            point_at_table(backend, GroupTable(pool, table))
            backend.init_cuda_graph_state(max_bs, max_num_tokens)
            self.backends.append(backend)
        count = len(self.groups.tables)
        self.seq_lens = torch.zeros(count, max_bs, dtype=torch.int64, device=device)
        self.out_cache_loc = torch.zeros(count, max_num_tokens, dtype=torch.int64, device=device)
        if self.groups.pools is not None:
            self.lengths = torch.zeros_like(self.groups.pools.lengths, device=device)

    def prepare(self, forward_batch: object, in_capture: bool) -> None:
        """Fill the buffers and every group backend's graph metadata for a decode graph of
        ``forward_batch.batch_size`` rows, right after SGLang did so for group 0 (outside the graph).

        Args:
            forward_batch: the graph batch as SGLang hands it to ``init_forward_metadata_out_graph``: at capture
                the runner's static batch (every row padding), at replay its view of them (``num_padding`` padded
                rows last; ``seq_lens``/``out_cache_loc`` the live rows' first).
            in_capture: whether a graph is about to be captured.
        """
        bs = forward_batch.batch_size
        real = 0 if in_capture else bs - int(getattr(forward_batch, "num_padding", 0) or 0)
        self.seq_lens[:, real:bs] = self.stock_backend.get_cuda_graph_seq_len_fill_value()
        self.out_cache_loc[:, real:bs] = 0
        if real:
            lengths = None
            if self.lengths is not None:
                lengths = self.lengths
                lengths.copy_(self.groups.pools.lengths)
            rows = forward_batch.req_pool_indices[:real]
            for group in range(len(self.backends)):
                seq_lens, out_cache_loc = self.groups.decode_inputs(
                    group, rows, forward_batch.seq_lens[:real], forward_batch.out_cache_loc[:real], lengths
                )
                self.seq_lens[group, :real] = seq_lens
                self.out_cache_loc[group, :real] = out_cache_loc
        for group, backend in enumerate(self.backends):
            view = self.view(group, forward_batch)
            view.seq_lens_cpu = None
            backend.init_forward_metadata_out_graph(view, in_capture=in_capture)

    def view(self, group: int, forward_batch: object) -> object:
        """The batch group ``group + 1``'s layers get inside a decode graph: ``forward_batch`` (the runner's static
        batch) with the group's buffers; host-side lengths are those of the capture, which no replay reads."""
        bs = forward_batch.batch_size
        view = copy.copy(forward_batch)
        view.seq_lens = self.seq_lens[group, :bs]
        view.out_cache_loc = self.out_cache_loc[group, :bs]
        return view


def attach_decode_graph_hook(result: object, model_runner: object, *args: object, **kwargs: object) -> None:
    """After ``ModelRunner.init_attention_backends``: give a model with layer groups on the ``triton`` attention
    backend a :class:`DecodeGraph` (its buffers are allocated only when SGLang prepares decode graphs)."""
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    groups = getattr(model_runner.model, "lightkv_groups", None)
    backend = model_runner.attn_backend
    if groups is None or not isinstance(backend, TritonAttnBackend):
        return
    graph = DecodeGraph(groups, backend, lambda: type(backend)(model_runner))
    backend.__dict__[GRAPH_ATTRIBUTE] = graph
    groups.decode_graph = graph


def graph_state_hook(result: object, backend: object, max_bs: int, max_num_tokens: int, *args, **kwargs) -> None:
    """After ``TritonAttnBackend.init_cuda_graph_state`` of a backend with a :class:`DecodeGraph`: its buffers."""
    graph = backend.__dict__.get(GRAPH_ATTRIBUTE)
    if graph is not None:
        graph.init_state(max_bs, max_num_tokens)


def graph_metadata_hook(
    result: object, backend: object, forward_batch: object, in_capture: bool = False, *args, **kwargs
) -> None:
    """After ``TritonAttnBackend.init_forward_metadata_out_graph`` (SGLang's graph metadata, at capture and before
    each replay) of a backend with a :class:`DecodeGraph`, for a decode graph: the groups' buffers and metadata."""
    graph = backend.__dict__.get(GRAPH_ATTRIBUTE)
    if graph is not None and forward_batch.forward_mode.is_decode():
        if not graph.ready:
            raise RuntimeError("lightkv: a decode graph's metadata is prepared before its state was allocated")
        graph.prepare(forward_batch, in_capture)


#: ``(target, hook, kind)`` of the decode-graph hooks (registered by the plugin with the pools' hooks).
GRAPH_HOOKS = (
    (
        "sglang.srt.model_executor.model_runner.ModelRunner.init_attention_backends",
        attach_decode_graph_hook,
        HookType.AFTER,
    ),
    (
        "sglang.srt.layers.attention.triton_backend.TritonAttnBackend.init_cuda_graph_state",
        graph_state_hook,
        HookType.AFTER,
    ),
    (
        "sglang.srt.layers.attention.triton_backend.TritonAttnBackend.init_forward_metadata_out_graph",
        graph_metadata_hook,
        HookType.AFTER,
    ),
)
