"""SGLang's decode CUDA-graph runner emulated on a CPU: :class:`EmulatedDecodeGraphs`.

It takes the runner's steps, with SGLang's own functions where they exist: ``init_cuda_graph_state`` of the attention
backend, capture of each batch size over fixed input buffers (padded rows: request-pool row 0, ``seq_len`` fill
value, slot 0) with ``init_forward_metadata_out_graph(..., in_capture=True)``, and per replay the buffers refilled
from the live batch, ``build_replay_fb_view`` and ``init_forward_metadata_out_graph`` before the "replay".

A CPU cannot record a graph, so a replay reruns the captured forward on the fixed buffers, under SGLang's capture
mode, with every attention backend's metadata put back to the object it had at capture (kernels bound to it at
capture read it at every replay). What a replay may not read is poisoned while it runs: the request-to-token tables
of every group and the pools' host lengths, which only the preparation before a replay may read. A forward that
reads them, or that computes its inputs in Python at capture, then gives other tokens than the eager decode.
"""

from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import torch


class EmulatedDecodeGraphs:
    """Decode graphs of batch sizes ``capture_sizes`` for ``model_runner`` (SGLang's ``ModelRunner``, triton
    attention backend), captured on first use."""

    def __init__(self, model_runner: object, capture_sizes: tuple[int, ...]) -> None:
        self.model_runner = model_runner
        self.backend = model_runner.attn_backend
        self.capture_sizes = sorted(capture_sizes)
        max_bs = self.capture_sizes[-1]
        self.backend.init_cuda_graph_state(max_bs, max_bs)
        self.fill = self.backend.get_cuda_graph_seq_len_fill_value()
        device = model_runner.device
        self.buffers = SimpleNamespace(
            input_ids=torch.zeros(max_bs, dtype=torch.int64, device=device),
            req_pool_indices=torch.zeros(max_bs, dtype=torch.int64, device=device),
            seq_lens=torch.full((max_bs,), self.fill, dtype=torch.int64, device=device),
            seq_lens_cpu=torch.full((max_bs,), self.fill, dtype=torch.int64),
            out_cache_loc=torch.zeros(max_bs, dtype=torch.int64, device=device),
            positions=torch.zeros(max_bs, dtype=torch.int64, device=device),
            mrope_positions=torch.zeros(3, max_bs, dtype=torch.int64, device=device),
            encoder_lens=None,
            mamba_track_indices=None,
        )
        #: per captured batch size: the static batch and every backend's metadata at capture
        self.captured: dict[int, tuple[object, list]] = {}
        #: the graph batch size of the latest replay
        self.replayed_size = 0
        #: per later group, an eager triton backend on the group's table (for :meth:`mismatches`)
        self.eager_backends: list[object] = []

    @property
    def graph(self) -> object:
        """The plugin's decode-graph state of the runner's backend."""
        from lightkv_adapters.sglang.decode_graph import GRAPH_ATTRIBUTE

        return self.backend.__dict__[GRAPH_ATTRIBUTE]

    def replay(self, live: object) -> torch.Tensor:
        """Next-token logits ``(B, V)`` of the live decode ``ForwardBatch`` ``live`` by a replay of the graph of the
        smallest captured batch size that holds it."""
        from sglang.srt.model_executor.forward_batch_info import ForwardMode
        from sglang.srt.model_executor.runner.decode_cuda_graph_runner import build_replay_fb_view

        raw = live.batch_size
        bs = next(size for size in self.capture_sizes if size >= raw)
        self.replayed_size = bs
        static = self._captured_batch(bs, live)
        self._load(live, raw, bs)
        view = build_replay_fb_view(
            live,
            self.buffers,
            bs,
            raw,
            bs,
            None,
            self.fill,
            ForwardMode.DECODE,
            False,
        )
        self.backend.init_forward_metadata_out_graph(view)
        return self._run(static, bs)[:raw]

    def _load(self, live: object, raw: int, bs: int) -> None:
        """The live batch into the fixed buffers, padded as SGLang pads them."""
        buffers = self.buffers
        for name, pad in (("input_ids", 0), ("req_pool_indices", 0), ("out_cache_loc", 0), ("positions", 0)):
            target = getattr(buffers, name)
            target[:raw] = getattr(live, name)
            target[raw:bs] = pad
        buffers.seq_lens[:raw] = live.seq_lens
        buffers.seq_lens[raw:bs] = self.fill
        buffers.seq_lens_cpu.copy_(buffers.seq_lens.cpu())
        if live.mrope_positions is not None:
            buffers.mrope_positions[:, :raw] = live.mrope_positions
            buffers.mrope_positions[:, raw:bs] = 0

    def _captured_batch(self, bs: int, template: object) -> object:
        """The static batch of size ``bs`` (captured now if it was not), made as SGLang's ``capture_prepare`` makes
        it: ``template``'s fields over the fixed buffers, every row padding."""
        if bs in self.captured:
            return self.captured[bs][0]
        buffers = self.buffers
        buffers.req_pool_indices.zero_()
        buffers.out_cache_loc.zero_()
        buffers.positions.zero_()
        buffers.mrope_positions.zero_()
        buffers.seq_lens.fill_(self.fill)
        buffers.seq_lens_cpu.fill_(self.fill)
        static = _static_batch(template, buffers, bs)
        self.backend.init_forward_metadata_out_graph(static, in_capture=True)
        self.captured[bs] = (static, self._metadata())
        self._run(static, bs)  # the capture run (its outputs are of padding rows only)
        return static

    def _metadata(self) -> list:
        return [self.backend.forward_metadata, *(backend.forward_metadata for backend in self.graph.backends)]

    def _run(self, static: object, bs: int) -> torch.Tensor:
        """The captured forward over the fixed buffers, with the metadata of its capture and the state no replay
        reads poisoned."""
        from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
        from sglang.srt.model_executor.runner_utils.capture_mode import model_capture_mode

        metadata = self.captured[bs][1]
        self.backend.forward_metadata = metadata[0]
        for backend, captured in zip(self.graph.backends, metadata[1:], strict=True):
            backend.forward_metadata = captured
        model = self.model_runner.model
        with (
            torch.no_grad(),
            model_capture_mode(),
            forward_context(ForwardContext(attn_backend=self.backend), forward_batch=static),
            self._poisoned(),
        ):
            output = model.forward(static.input_ids, static.positions, static)
        return output.next_token_logits.clone()

    def mismatches(self, live: object) -> list[str]:
        """After a replay of ``live``: where the replay's inputs differ from what the eager decode of ``live`` reads,
        group by group: ``seq_lens``, ``out_cache_loc`` and the attention metadata (``kv_indptr``, ``kv_indices``) an
        eager triton backend on the group's table builds for them; and the padded rows' fill value and slot 0."""
        from lightkv_adapters.sglang.group_tables import GroupTable, point_at_table

        graph = self.graph
        groups = graph.groups
        lengths = None if groups.pools is None else groups.pools.lengths.to(live.seq_lens.device)
        raw = live.batch_size
        problems = []
        padded = slice(raw, self.replayed_size)
        if (graph.seq_lens[:, padded] != self.fill).any() or (graph.out_cache_loc[:, padded] != 0).any():
            problems.append(
                f"padded rows: seq_lens {graph.seq_lens[:, padded].tolist()}, out_cache_loc "
                f"{graph.out_cache_loc[:, padded].tolist()} (want {self.fill} and slot 0)"
            )
        if not self.eager_backends:
            pool = self.model_runner.req_to_token_pool
            for table in groups.tables:
                backend = type(self.backend)(self.model_runner)
                point_at_table(backend, GroupTable(pool, table))
                self.eager_backends.append(backend)
        for group, eager in enumerate(self.eager_backends):
            seq_lens, out_cache_loc = groups.decode_inputs(
                group, live.req_pool_indices, live.seq_lens, live.out_cache_loc, lengths
            )
            view = copy.copy(live)
            view.seq_lens, view.out_cache_loc = seq_lens, out_cache_loc
            view.seq_lens_cpu = seq_lens.cpu()
            view.seq_lens_sum = int(view.seq_lens_cpu.sum())
            eager.init_forward_metadata(view)
            want, got = eager.forward_metadata, graph.backends[group].forward_metadata
            total = view.seq_lens_sum
            pairs = {
                "seq_lens": (graph.seq_lens[group, :raw], seq_lens),
                "out_cache_loc": (graph.out_cache_loc[group, :raw], out_cache_loc),
                "kv_indptr": (got.kv_indptr[: raw + 1], want.kv_indptr[: raw + 1]),
                "kv_indices": (got.kv_indices[:total], want.kv_indices[:total]),
            }
            for name, (replayed, eager_value) in pairs.items():
                if not torch.equal(replayed.to(torch.int64), eager_value.to(torch.int64)):
                    problems.append(
                        f"group {group + 1} {name}: replay {replayed.tolist()} != eager {eager_value.tolist()}"
                    )
        return problems

    @contextlib.contextmanager
    def _poisoned(self):
        """Every request-to-token table and the pools' lengths zeroed (each row then reads padding slot 0)."""
        groups = self.graph.groups
        targets = [self.model_runner.req_to_token_pool.req_to_token, *groups.tables]
        if groups.pools is not None:
            targets.append(groups.pools.lengths)
        saved = [target.clone() for target in targets]
        for target in targets:
            target.zero_()
        try:
            yield
        finally:
            for target, kept in zip(targets, saved, strict=True):
                target.copy_(kept)


def _static_batch(template: object, buffers: SimpleNamespace, bs: int) -> object:
    """A shallow copy of the decode batch ``template`` whose per-row fields are the fixed buffers' first ``bs``."""
    static = copy.copy(template)
    static.batch_size = bs
    static.input_ids = buffers.input_ids[:bs]
    static.req_pool_indices = buffers.req_pool_indices[:bs]
    static.seq_lens = buffers.seq_lens[:bs]
    static.seq_lens_cpu = buffers.seq_lens_cpu[:bs]
    static.seq_lens_sum = int(buffers.seq_lens_cpu[:bs].sum())
    static.out_cache_loc = buffers.out_cache_loc[:bs]
    static.positions = buffers.positions[:bs]
    if template.mrope_positions is not None:
        static.mrope_positions = buffers.mrope_positions[:, :bs]
    return static
