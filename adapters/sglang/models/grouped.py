"""The decoder loop of a SGLang text model with in-prefill token reduction, and the layer-group views that let
later layers read and write only the survivors' KV slots (:class:`LayerGroups`).

README, "SGLang" ("What it does", and "Memory" for the layer-group pools).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from sglang.srt.layers.layer_boundary.residual import batch as residual_batch
from sglang.srt.model_executor.forward_context import get_forward_context, set_forward_context
from sglang.srt.model_executor.runner_utils.capture_mode import get_is_capture_mode
from torch import nn

from lightkv_adapters.sglang import failures
from lightkv_adapters.sglang.group_tables import GroupTable, use_table
from lightkv_adapters.sglang.packing import left_mask, logprob_starts, pad_left, pad_positions, shift_spans
from lightkv_core.methods import PrefillReduction
from lightkv_core.plan import LengthPlan
from lightkv_core.prefill import at_default_scale, survivor_columns
from lightkv_core.shards import HeadShards

if TYPE_CHECKING:
    from lightkv_adapters.sglang.decode_graph import DecodeGraph
    from lightkv_adapters.sglang.group_cache import LayerGroupCache


@dataclass
class _Prefill:
    """One prefill batch's bookkeeping while its layers run."""

    spans: list[list]  # per request, vision spans in request-local token indices
    prefixes: list[int]  # per request, tokens it held before this extend (a text-only prompt's earlier chunks)
    lengths: list[int]  # per request, current token count of this extend
    origin: list[torch.Tensor]  # per request, (length,) prompt index of every current token
    starts: list[int]  # per request, where its prompt starts in the stock packed batch
    positions: torch.Tensor  # (N,) or (3, N) the stock position ids the layers get

    def stock_index(self) -> torch.Tensor:
        """``(N',)`` index in the stock packed batch of every current token."""
        return torch.cat([start + origin for start, origin in zip(self.starts, self.origin, strict=True)])


class LayerGroups:
    """The reduction state of one text model (one per model instance, shared by its forward calls).

    Layers are split into *groups* at the method's reduce layers: group 0 runs up to and including the first
    reduce layer on the full sequence, group ``g`` runs after the ``g``-th reduction on its survivors. A request
    owns the same KV slots as in stock SGLang (one per prompt token plus one per decoded token; the single pool
    gives every slot storage in every layer). Group ``g`` sees, per request:

    * its survivors, each writing its K/V into the slot of its own prompt token (a merged token into its B
      token's), in a per-group request-to-token table whose row lists the survivors' slots then the decoded
      tokens' slots;
    * ``seq_lens`` shortened by the tokens the request dropped before the group (its *dropped* count, kept per
      request-pool row from its prefill to its last decode step);
    * the survivors' original positions (M-RoPE included), so decoding continues at the stock positions.

    In prefill the hidden states are packed (``(N, D)``, requests one after another) as SGLang passes them; the
    method sees them left-padded to ``(B, S, D)`` and its output is packed again. The ``ForwardBatch`` a group's
    layers get is a shallow copy of the real one with those fields replaced; the attention backend is pointed at
    the group's table while the group runs (:func:`~lightkv_adapters.sglang.group_tables.use_table`); while a decode
    CUDA graph is captured each group's layers run with a backend of their own instead (:attr:`decode_graph`).
    Logits are taken from the last group's view.

    Args:
        text_model: SGLang's ``Qwen2Model`` / ``LlamaModel`` (``layers``, ``embed_tokens``, ``norm``).
        method: the in-prefill reduction (LightKV or FastV) of this server.
        spans_of: ``spans_of(mm_inputs, seq_len)``: one request's vision spans (prompt token indices) from its
            SGLang multimodal inputs.

    With layer-group pools (:attr:`pools` set by :func:`lightkv_adapters.sglang.pools.install_pools`), group
    ``g``'s table and slots are the pools' own: its survivors write into the slots the request's plan reserved
    in that group (what the plan over-reserved is given back), and each decoded token into its own slot there.
    Without them, every group indexes the single pool's slots as described above.
    """

    def __init__(
        self, text_model: nn.Module, method: PrefillReduction, spans_of: Callable[[object, int], list]
    ) -> None:
        num_layers = len(text_model.layers)
        if method.position_mode != "original":
            raise ValueError("SGLang decoding continues at the stock positions: the method must keep original ones")
        if not method.reduce_layers or method.reduce_layers[0] < 0 or method.reduce_layers[-1] >= num_layers - 1:
            raise ValueError(
                f"reduce layers {method.reduce_layers} must lie in 0..{num_layers - 2} of a {num_layers}-layer model"
            )
        self.method = method
        self.spans_of = spans_of
        self.pools: LayerGroupCache | None = None
        self.reduce_layers = tuple(method.reduce_layers)
        self.spans: list[list] | None = None
        self.final_batch: object | None = None
        self._captured: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
        #: per group after the first: ``(rows, context)`` request-to-token table (the pools' own with layer-group pools)
        self.tables: list[torch.Tensor] = []
        #: set under CUDA-graph decode (:func:`lightkv_adapters.sglang.decode_graph.attach_decode_graph_hook`)
        self.decode_graph: DecodeGraph | None = None
        self._dropped: torch.Tensor | None = None
        for index in self.reduce_layers:
            text_model.layers[index].self_attn.attn.register_forward_pre_hook(self._capture(index))
        self._capturing = False

    def _capture(self, index: int):
        def hook(module: nn.Module, args: tuple) -> None:
            if self._capturing:
                q, k = args[0], args[1]
                self._captured[index] = (
                    q.reshape(q.shape[0], module.tp_q_head_num, module.qk_head_dim),
                    k.reshape(k.shape[0], module.tp_k_head_num, module.qk_head_dim),
                    float(module.scaling),
                )

        return hook

    # ---- group tables -------------------------------------------------------------------------------

    def plan_request(self, req: object, seq_len: int) -> LengthPlan:
        """Tokens a request (SGLang's ``Req``) of ``seq_len`` prompt tokens will hold in each layer group."""
        inputs = req.multimodal_inputs
        spans = [] if inputs is None else self.spans_of(inputs, seq_len)
        return self.method.plan_lengths(spans, seq_len)

    def ensure_tables(self, pool: object) -> None:
        """Allocate the groups' request-to-token tables (the pools' own with layer-group pools) and dropped counts for
        ``pool``'s rows, once."""
        table = pool.req_to_token
        if self._dropped is not None and self._dropped.shape[1] == table.shape[0]:
            return
        groups = len(self.reduce_layers)
        self.tables = self.pools.tables if self.pools is not None else [torch.zeros_like(table) for _ in range(groups)]
        self._dropped = torch.zeros(groups, table.shape[0], dtype=torch.int64, device=table.device)

    def _reset_rows(self, forward_batch: object, pool: object) -> None:
        """Every request of an extend batch starts with the stock rows in every group (nothing dropped); with
        layer-group pools the rows already hold the slots of the request's plan."""
        self.ensure_tables(pool)
        rows = forward_batch.req_pool_indices
        self._dropped[:, rows] = 0
        if self.pools is not None:
            return
        width = int(forward_batch.seq_lens.max())
        for table in self.tables:
            table[rows, :width] = pool.req_to_token[rows, :width]

    def dropped_tokens(self, rows: torch.Tensor) -> list[int]:
        """Prompt tokens each request (by request-pool row) no longer holds after the last reduction."""
        if self._dropped is None:
            return [0] * len(rows)
        return self._dropped[-1, rows].tolist()

    # ---- forward ------------------------------------------------------------------------------------

    def forward(
        self,
        text_model: nn.Module,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        forward_batch: object,
        input_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        """The text model's forward (first and last pipeline rank only): ``(N', D)`` final-normed hidden
        states of the tokens the last group holds. Sets :attr:`final_batch` to the view logits must use."""
        spans, self.spans = self.spans, None
        mode = forward_batch.forward_mode
        hidden = text_model.embed_tokens(input_ids) if input_embeds is None else input_embeds
        context = get_forward_context()
        backend = context.attn_backend
        pool = backend.req_to_token_pool
        prefill = None
        view = forward_batch
        graph = self._graph_of(mode)
        lengths = None
        if mode.is_extend():
            self._reset_rows(forward_batch, pool)
            if spans is not None and any(spans) or self.pools is not None:
                spans = spans if spans is not None else [[] for _ in range(forward_batch.batch_size)]
                try:
                    prefill = self._start_prefill(forward_batch, spans, positions)
                except Exception as error:
                    self.final_batch = view
                    return failures.fail_batch(hidden, forward_batch.rids, error)
        elif not mode.is_decode():
            raise NotImplementedError(f"lightkv layer groups do not support forward mode {mode!r}")
        elif self.pools is not None and graph is None:
            lengths = self.pools.lengths.to(forward_batch.seq_lens.device)
        residual_batch.start(view)
        try:
            for index in range(len(text_model.layers)):
                self._capturing = prefill is not None and index in self.reduce_layers
                hidden = text_model.layers[index](positions, hidden, view)
                if index not in self.reduce_layers:
                    continue
                group = self.reduce_layers.index(index)
                if prefill is not None:
                    try:
                        hidden, view, positions = self._reduce(index, group, hidden, view, forward_batch, prefill, pool)
                    except Exception as error:
                        self.final_batch = view
                        return failures.fail_batch(hidden, forward_batch.rids, error)
                elif graph is not None:  # capturing a decode graph: the group's buffers and backend
                    view = _carry(view, graph.view(group, forward_batch))
                    set_forward_context(replace(context, attn_backend=graph.backends[group]))
                    continue
                elif mode.is_decode():
                    seq_lens, out_cache_loc = self.decode_inputs(
                        group,
                        forward_batch.req_pool_indices,
                        forward_batch.seq_lens,
                        forward_batch.out_cache_loc,
                        lengths,
                    )
                    view = _carry(view, _decode_view(forward_batch, seq_lens, out_cache_loc))
                else:
                    continue  # an extend with nothing to reduce: every group's rows are the stock ones
                use_table(backend, GroupTable(pool, self.tables[group]), view)
            hidden = residual_batch.final_norm(hidden, view, text_model.norm, skip_empty=True)
        finally:
            self._capturing = False
            self._captured.clear()
            if graph is not None:
                set_forward_context(context)
            elif view is not forward_batch:
                use_table(backend, pool, forward_batch)
        self.final_batch = view
        return hidden

    def _start_prefill(self, forward_batch: object, spans: list[list], positions: torch.Tensor) -> _Prefill:
        prefixes = [int(n) for n in forward_batch.extend_prefix_lens_cpu]
        if any(request_spans and prefix for request_spans, prefix in zip(spans, prefixes, strict=True)):
            raise NotImplementedError(
                "lightkv compresses an image in one prefill, but this request's prompt was split (its images are "
                "admitted whole: see lightkv_adapters.sglang.admission.admission_hook)"
            )
        if forward_batch.return_logprob and any(
            start < length
            for start, length, request_spans in zip(
                forward_batch.extend_logprob_start_lens_cpu, forward_batch.extend_seq_lens_cpu, spans, strict=True
            )
            if request_spans
        ):
            raise NotImplementedError("input-token logprobs of a compressed prompt are not available (merged tokens)")
        lengths = [int(n) for n in forward_batch.extend_seq_lens_cpu]
        device = positions.device
        starts = [sum(lengths[:b]) for b in range(len(lengths))]
        origin = [torch.arange(n, device=device) for n in lengths]
        return _Prefill(spans, prefixes, lengths, origin, starts, positions)

    def _reduce(
        self,
        index: int,
        group: int,
        hidden: torch.Tensor,
        view: object,
        forward_batch: object,
        prefill: _Prefill,
        pool: object,
    ) -> tuple[torch.Tensor, object, torch.Tensor]:
        """Run the method on the output of layer ``index`` and build the view of group ``group + 1``."""
        stream = residual_batch.stream_of(view)
        if stream.pending is not None and not stream.pending.update.is_plain_add:
            raise NotImplementedError("lightkv needs a plain residual add at a reduce layer")
        output, residual = stream.export(hidden)
        full = output if residual is None else output + residual
        residual_batch.clear(view)
        q, k, scaling = self._captured.pop(index)
        if not any(prefill.spans):  # only with layer-group pools: the group's own slots, nothing reduced
            stock = prefill.stock_index()
            new_view = self._prefill_view(group, forward_batch, prefill, stock, pool)
            residual_batch.start(new_view)
            return full, new_view, prefill.positions[..., stock]
        q = at_default_scale(q, scaling)
        lengths = prefill.lengths
        width = max(lengths)
        mask = left_mask(lengths, width, full.device)
        padded_positions = pad_positions(prefill.positions[..., prefill.stock_index()], mask)
        result = self.method.reduce(
            index,
            pad_left(full, mask),
            pad_left(q, mask).permute(0, 2, 1, 3),
            pad_left(k, mask).permute(0, 2, 1, 3),
            [shift_spans(s, width - n) for s, n in zip(prefill.spans, lengths, strict=True)],
            position_ids=padded_positions,
            attention_mask=mask,
            padding_side="left",
            head_shards=_head_shards(),
        )
        origin = survivor_columns(pad_left(torch.cat(prefill.origin), mask, fill=-1), result.kept_padded)
        alive = origin >= 0
        new_lengths = alive.sum(dim=1).tolist()
        prefill.origin = [row[keep] for row, keep in zip(origin, alive, strict=True)]
        prefill.lengths = new_lengths
        prefill.spans = [shift_spans(s, -(origin.shape[1] - n)) for s, n in zip(result.spans, new_lengths, strict=True)]
        merged = result.hidden.to(full.dtype)[alive]
        stock = prefill.stock_index()
        new_view = self._prefill_view(group, forward_batch, prefill, stock, pool)
        residual_batch.start(new_view)
        return merged, new_view, prefill.positions[..., stock]

    def _prefill_view(
        self, group: int, forward_batch: object, prefill: _Prefill, stock: torch.Tensor, pool: object
    ) -> object:
        device = forward_batch.seq_lens.device
        lengths = torch.tensor(prefill.lengths, device=device, dtype=forward_batch.seq_lens.dtype)
        seq_lens = lengths + torch.tensor(prefill.prefixes, device=device, dtype=lengths.dtype)
        rows = forward_batch.req_pool_indices
        table = self.tables[group]
        origin_slots = []
        for b, (prefix, origin) in enumerate(zip(prefill.prefixes, prefill.origin, strict=True)):
            row = int(rows[b])
            end = prefix + len(origin)
            if self.pools is not None:
                self.pools.trim(group + 1, row, end)
                slots = table[row, prefix:end]
            else:
                slots = pool.req_to_token[row, prefix + origin]
                table[row, prefix:end] = slots
            origin_slots.append(slots)
        self._dropped[group, rows] = forward_batch.seq_lens.to(torch.int64) - seq_lens.to(torch.int64)
        view = copy.copy(forward_batch)
        view.out_cache_loc = torch.cat(origin_slots).to(forward_batch.out_cache_loc.dtype)
        view.input_ids = None if forward_batch.input_ids is None else forward_batch.input_ids[stock]
        view.positions = forward_batch.positions[stock]
        if forward_batch.mrope_positions is not None:
            view.mrope_positions = forward_batch.mrope_positions[:, stock]
        view.seq_lens = seq_lens
        view.seq_lens_cpu = seq_lens.cpu()
        view.seq_lens_sum = int(seq_lens.sum())
        view.extend_seq_lens = lengths.to(forward_batch.extend_seq_lens.dtype)
        view.extend_seq_lens_cpu = list(prefill.lengths)
        view.extend_start_loc = torch.cumsum(view.extend_seq_lens, 0) - view.extend_seq_lens
        view.extend_num_tokens = sum(prefill.lengths)
        view.extend_logprob_start_lens_cpu = logprob_starts(forward_batch, prefill.lengths)
        view.num_token_non_padded = None
        view.global_num_token_non_padded_cpu = view.extend_num_tokens
        view.orig_seq_lens = None
        view.residual_stream = None
        return view

    def _graph_of(self, mode: object) -> DecodeGraph | None:
        """The decode graph whose capture this forward is (``None``: an eager forward)."""
        if not (mode.is_decode() and get_is_capture_mode()):
            return None
        if self.decode_graph is None or not self.decode_graph.ready:
            raise RuntimeError(
                "lightkv: SGLang captures a decode CUDA graph, but the layer groups have no decode-graph state (it is "
                "built for the triton attention backend only: see lightkv_adapters.sglang.decode_graph)"
            )
        return self.decode_graph

    def decode_inputs(
        self,
        group: int,
        rows: torch.Tensor,
        seq_lens: torch.Tensor,
        out_cache_loc: torch.Tensor,
        lengths: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What layer group ``group + 1`` reads in a decode step: ``(seq_lens, out_cache_loc)`` of the requests in
        request-pool rows ``rows`` (``(B,)``), whose stock lengths (new token included) and new token's slots are
        ``seq_lens`` / ``out_cache_loc`` (``(B,)``).

        With layer-group pools a row holds ``lengths[group, row]`` tokens in the group (``lengths``: the pools'
        :attr:`~lightkv_adapters.sglang.group_cache.LayerGroupCache.lengths` on the rows' device), its new token's
        slot last in the group's table. Without them (``lengths`` is ``None``) it holds its stock length less the
        tokens it dropped before the group, and the new token's stock slot is written into the group's table. Only
        device operations: the eager decode and a decode graph's replay preparation both read their inputs here.
        """
        table = self.tables[group]
        if self.pools is not None:
            held = lengths[group, rows]
            return held.to(seq_lens.dtype), table[rows, held - 1].to(out_cache_loc.dtype)
        group_lens = seq_lens - self._dropped[group, rows].to(seq_lens.dtype)
        table[rows, group_lens.to(torch.int64) - 1] = out_cache_loc.to(table.dtype)
        return group_lens, out_cache_loc


def _decode_view(forward_batch: object, seq_lens: torch.Tensor, out_cache_loc: torch.Tensor) -> object:
    """A shallow copy of a decode batch with a layer group's ``seq_lens`` (host copies included) and
    ``out_cache_loc``."""
    view = copy.copy(forward_batch)
    view.seq_lens = seq_lens
    view.seq_lens_cpu = seq_lens.cpu()
    view.seq_lens_sum = int(view.seq_lens_cpu.sum())
    view.out_cache_loc = out_cache_loc
    return view


def _carry(view: object, new_view: object) -> object:
    """``new_view`` continuing the residual stream of the layers that got ``view``."""
    new_view.residual_stream = view.residual_stream
    return new_view


def _head_shards() -> HeadShards | None:
    """This tensor-parallel rank's share of the attention heads (``None`` on one rank): the guide scores its layers'
    local heads give are summed over SGLang's TP group."""
    from sglang.srt.distributed import get_tp_group

    group = get_tp_group()
    return None if group.world_size == 1 else HeadShards(group.world_size, group.all_reduce)
