"""Runs a saved tiny model through SGLang's own model runner on the CPU: ``ModelRunner`` with its real
``ReqToTokenPool``/``MHATokenToKVPool`` and ``TorchNativeAttnBackend``, batches made by ``ScheduleBatch``
and ``ForwardBatch.init_new`` as the scheduler makes them (the path of ``sglang.benchmark.one_batch``).

Requests carry their images the way SGLang's multimodal processor of the model's family hands them to the
scheduler: Qwen-VL prompts hold every image token and each image's ``(t, h, w)`` grid with its token
offsets and M-RoPE positions; LLaVA prompts hold one image token per image, which the model's
``pad_input_ids`` expands into the image's pad values (recording ``image_offsets`` / ``image_pad_len``).

Each run happens in a fresh spawned process (:func:`run_in_child`): SGLang's runtime context, distributed
group and model registry are process-wide.
"""

from __future__ import annotations

import multiprocessing
from array import array
from dataclasses import dataclass, field

import torch

#: The float type of every run (the Transformers side of the comparisons runs in float32 too).
DTYPE = "float32"


@dataclass
class Request:
    """One prompt: its token ids and each image's pixels; for Qwen-VL also each image's ``(t, h, w)`` patch
    grid. Qwen-VL ids hold every image token; LLaVA ids hold one image token per image."""

    input_ids: list[int]
    pixel_values: list[torch.Tensor]
    grids: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Run:
    """What a run produced: ``tokens`` ``(B, steps)`` greedy tokens, ``logits`` one ``(B, V)`` per step,
    ``dropped`` per request the prompt tokens the last layer group no longer holds.

    With layer-group pools: ``pool_sizes`` slots per group (``arena_layers``: the layers of each group where they
    share an arena of pages), ``held`` per request the tokens it holds in each
    group after the first at the end, and, once every request was released as the scheduler releases a
    finished one, ``free_after_release`` each later group's free slots and ``leaks`` the pools' own check."""

    tokens: torch.Tensor
    logits: list[torch.Tensor]
    dropped: list[int]
    pool_sizes: list[int] = field(default_factory=list)
    arena_layers: list[int] = field(default_factory=list)
    held: list[list[int]] = field(default_factory=list)
    free_after_release: list[int] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    graph_mismatches: list[str] = field(default_factory=list)


def run_in_child(*args: object, **kwargs: object) -> Run:
    """:func:`run` (same arguments) in a spawned process, so that every run starts from a clean SGLang."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(run, args, kwargs)


def run(
    model_dir: str,
    method: str,
    requests: list[Request],
    steps: int,
    pools: str = "shared",
    logprobs: bool = False,
    attention_backend: str = "torch_native",
    decode: str = "eager",
    leave_after: int | None = None,
    device: str = "cpu",
) -> Run:
    """Prefill ``requests`` as one batch, then decode ``steps - 1`` tokens greedily, with ``--kv-compress
    method`` (its released defaults) and ``--kv-compress-pool-ratios pools`` on the Qwen-VL or LLaVA model saved
    in ``model_dir``, on SGLang's ``attention_backend`` (``triton`` runs its kernels in Triton's interpreter on a
    CPU). The plugin's hooks are applied as SGLang applies them in a server process. ``logprobs``: every request
    asks for the logprobs of its output tokens (``"logprobs": true``, no input logprobs). ``decode="graph"``:
    decode steps replay SGLang's decode CUDA graphs as :class:`helpers.graph_replay.EmulatedDecodeGraphs` emulates
    them (triton backend); ``decode="cuda_graph"`` (``device="cuda"``): SGLang captures and replays real ones.
    ``leave_after``: the second request leaves the batch after that many decode steps."""
    if device == "cpu":
        from lightkv_adapters.sglang import cpu_env

        cpu_env.install()
    from sglang.benchmark import one_batch
    from sglang.srt.sampling.sampling_params import SamplingParams

    runner = _load(model_dir, method, pools, attention_backend, device, cuda_graph=decode == "cuda_graph")
    model = runner.torch_runner.model
    multimodal_inputs = _llava_inputs if model.config.model_type == "llava" else _qwen_vl_inputs
    reqs = []
    for index, request in enumerate(requests):
        ids = array("q", request.input_ids)
        mm_inputs = multimodal_inputs(model, request) if request.pixel_values else None
        padded = ids if mm_inputs is None else model.pad_input_ids(ids, mm_inputs)
        req = one_batch.Req(
            rid=index,
            origin_input_text="",
            origin_input_ids=padded,
            sampling_params=SamplingParams(temperature=0, max_new_tokens=steps),
        )
        req.multimodal_inputs = mm_inputs
        req.full_untruncated_fill_ids = req.origin_input_ids
        req.logprob_start_len = -1
        req.return_logprob = logprobs
        req.extend_end = len(padded)
        reqs.append(req)
    graphs, mismatches = None, []
    if decode == "graph":
        from helpers.graph_replay import EmulatedDecodeGraphs

        graphs = EmulatedDecodeGraphs(runner.torch_runner, capture_sizes=(1, 2, 4))
    rows = list(range(len(reqs)))
    lengths = {}
    with torch.no_grad():
        tokens, logits, batch = runner.extend(reqs)
        all_tokens, all_logits = [tokens], [logits]
        for step in range(steps - 1):
            if step == leave_after:
                lengths[rows[1]] = int(batch.seq_lens_cpu[1])
                keep = [0, *range(2, len(rows))]
                batch.filter_batch(keep_indices=keep)
                rows, tokens = [rows[i] for i in keep], tokens[keep]
            if graphs is None:
                tokens, logits = runner.decode(tokens, batch)
            else:
                tokens, logits = _graph_decode(graphs, tokens, batch, runner.torch_runner, mismatches, step)
            all_tokens.append(_spread(tokens, rows, len(reqs), -1))
            all_logits.append(_spread(logits, rows, len(reqs), float("nan")))
    lengths.update(zip(rows, batch.seq_lens_cpu.tolist(), strict=True))
    groups = getattr(model, "lightkv_groups", None)
    all_rows = torch.tensor([req.kv.req_pool_idx for req in reqs], device=batch.req_pool_indices.device)
    dropped = [0] * len(reqs) if groups is None else groups.dropped_tokens(all_rows)
    result = Run(torch.stack(all_tokens, dim=1), all_logits, dropped, graph_mismatches=mismatches)
    cache = getattr(groups, "pools", None)
    if cache is not None:
        model_runner = runner.torch_runner
        result.pool_sizes = [model_runner.token_to_kv_pool_allocator.size, *(a.size for a in cache.allocators)]
        result.arena_layers = [] if cache.arena is None else cache.arena.layer_counts
        result.held = [cache.lengths[:, req.kv.req_pool_idx].tolist() for req in reqs]
        _release(model_runner, reqs, [lengths[i] for i in range(len(reqs))])
        result.free_after_release = cache.available()
        result.leaks = cache.leaks()
    return result


def _graph_decode(graphs, tokens: torch.Tensor, batch, model_runner, mismatches: list[str], step: int):
    """One greedy decode step of ``batch`` by a replay of an emulated decode graph (``one_batch.decode`` with the
    graph in place of the eager forward); what the replay read against what the eager decode reads joins
    ``mismatches``."""
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

    batch.input_ids = tokens.to(torch.int64)
    batch.prepare_for_decode()
    forward_batch = ForwardBatch.init_new(batch, model_runner, return_hidden_states_before_norm=False)
    logits = graphs.replay(forward_batch)
    mismatches.extend(f"step {step}: {problem}" for problem in graphs.mismatches(forward_batch))
    return logits.argmax(dim=-1), logits


def _spread(values: torch.Tensor, rows: list[int], count: int, fill: float) -> torch.Tensor:
    """``values`` of the requests ``rows`` (one per row) as ``count`` rows, ``fill`` for the others."""
    out = values.new_full((count, *values.shape[1:]), fill)
    out[rows] = values
    return out


def _release(model_runner, reqs: list, lengths: list[int]) -> None:
    """Free every request's slots (``lengths[i]`` of request ``i``) and row as the scheduler frees a finished
    request (its KV slots to the allocator, then its request-pool row)."""
    pool = model_runner.req_to_token_pool
    for req, length in zip(reqs, lengths, strict=True):
        row = req.kv.req_pool_idx
        model_runner.token_to_kv_pool_allocator.free(pool.req_to_token[row, :length].to(torch.int64))
        pool.free(req)


def _load(model_dir: str, method: str, pools: str, attention_backend: str, device: str, cuda_graph: bool):
    """SGLang's model runner (as ``one_batch`` builds it) for the model in ``model_dir`` under ``--kv-compress
    method`` on ``attention_backend``, with our model classes registered over SGLang's; ``cuda_graph``: with full
    decode CUDA graphs of up to 4 requests (no prefill graphs)."""
    from sglang.benchmark import one_batch
    from sglang.srt.managers.mm_schedule import init_mm_embedding_cache
    from sglang.srt.models.registry import ModelRegistry, import_model_classes
    from sglang.srt.plugins.hook_registry import HookRegistry
    from sglang.srt.server_args import PortArgs, ServerArgs

    from lightkv_adapters.sglang import plugin
    from lightkv_adapters.sglang.settings import SETTINGS_ATTRIBUTE, kv_compress_settings

    plugin.register()
    HookRegistry.apply_hooks()
    ModelRegistry.models.update(import_model_classes("lightkv_adapters.sglang.models"))
    _load_llava_vision_towers_at(getattr(torch, DTYPE))
    server_args = ServerArgs(
        model_path=model_dir,
        tokenizer_path=model_dir,
        skip_tokenizer_init=True,
        device=device,
        attention_backend=attention_backend,
        disable_cuda_graph=not cuda_graph,
        cuda_graph_backend_decode="full" if cuda_graph else None,
        cuda_graph_backend_prefill="disabled" if cuda_graph else None,
        cuda_graph_bs_decode=[1, 2, 4] if cuda_graph else None,
        disable_radix_cache=True,
        chunked_prefill_size=-1,
        dtype=DTYPE,
        mem_fraction_static=0.05,
        max_total_tokens=4096,
        load_format="safetensors",
    )
    setattr(server_args, SETTINGS_ATTRIBUTE, kv_compress_settings(method, kv_compress_pool_ratios=pools))
    server_args.resolve_once()
    port_args = PortArgs.init_new(server_args)
    ranks = one_batch.SpawnRanks(world_rank=one_batch.spawn_world_rank(server_args, tp_rank=0, pp_rank=0), gpu_id=0)
    one_batch.publish(server_args, role="scheduler", ranks=ranks)
    one_batch._init_process_global_configs()
    one_batch.get_tokenizer = lambda *args, **kwargs: None  # skip_tokenizer_init: no tokenizer files
    runner, _ = one_batch.load_model(server_args, port_args, 0, 0)
    init_mm_embedding_cache(64 * 1024 * 1024)
    return runner


def _load_llava_vision_towers_at(dtype: torch.dtype) -> None:
    """Make SGLang's LLaVA load its CLIP vision tower at ``dtype``.

    ``LlavaBaseForCausalLM.load_weights`` loads the tower with ``torch_dtype=torch.float16`` whatever
    ``--dtype`` says (SGLang's LLaVA image processor hands it float16 pixels, and the config's ``auto``
    dtype is forced to float16 for ``Llava*ForCausalLM``); at ``--dtype float32`` its float16 features then
    meet the float32 projector. Only the tower's load dtype changes here; the model code runs as released.
    """
    from sglang.srt.models import llava
    from transformers import CLIPVisionModel

    class _CLIPVisionModelAtDtype:
        @staticmethod
        def from_pretrained(path: str, *args, torch_dtype=None, **kwargs) -> CLIPVisionModel:
            return CLIPVisionModel.from_pretrained(path, *args, dtype=dtype, **kwargs)

    llava.CLIPVisionModel = _CLIPVisionModelAtDtype


def _qwen_vl_inputs(model, request: Request):
    """Qwen2-VL / Qwen2.5-VL: one item per image at its run of image tokens, with the request's M-RoPE
    positions."""
    from sglang.srt.layers.rotary_embedding.mrope import MRotaryEmbedding
    from sglang.srt.managers.schedule_batch import MultimodalDataItem, MultimodalInputs
    from sglang.srt.multimodal.modality import Modality

    config = model.config
    ids = torch.tensor(request.input_ids)
    items = []
    runs = _runs(ids == config.image_token_id)
    for pixels, grid, (start, end) in zip(request.pixel_values, request.grids, runs, strict=True):
        item = MultimodalDataItem(modality=Modality.IMAGE, feature=pixels, offsets=[(start, end)])
        item.image_grid_thw = grid
        item.set_pad_value()
        items.append(item)
    positions, delta = MRotaryEmbedding.get_rope_index(
        spatial_merge_size=config.vision_config.spatial_merge_size,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id,
        model_type=config.model_type,
        tokens_per_second=getattr(config.vision_config, "tokens_per_second", None),
        input_ids=ids[None],
        image_grid_thw=torch.cat(request.grids),
    )
    return MultimodalInputs(
        mm_items=items,
        im_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        mrope_positions=positions.squeeze(1),
        mrope_position_delta=delta,
    )


def _llava_inputs(model, request: Request):
    """LLaVA: one item per image as SGLang's ``LlavaImageProcessor`` makes it: ``(1, 3, H, W)`` pixels, the
    image's ``(width, height)`` and the config's aspect ratio (``pad`` for LLaVA-1.5)."""
    from sglang.srt.managers.schedule_batch import MultimodalDataItem, MultimodalInputs
    from sglang.srt.multimodal.modality import Modality

    items = []
    for pixels in request.pixel_values:
        item = MultimodalDataItem(modality=Modality.IMAGE, feature=pixels)
        item.image_sizes = [(pixels.shape[-1], pixels.shape[-2])]
        item.image_aspect_ratio = model.config.image_aspect_ratio
        item.set_pad_value()
        items.append(item)
    return MultimodalInputs(mm_items=items, im_token_id=model.config.image_token_index)


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """Inclusive ``(start, end)`` of every run of ``True`` in ``mask``."""
    runs, start = [], None
    for index, value in enumerate(mask.tolist() + [False]):
        if value and start is None:
            start = index
        elif not value and start is not None:
            runs.append((start, index - 1))
            start = None
    return runs
