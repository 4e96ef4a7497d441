"""Runs a saved tiny model through SGLang's own model runner on the CPU: ``ModelRunner`` with its real
``ReqToTokenPool``/``MHATokenToKVPool`` and ``TorchNativeAttnBackend``, batches made by ``ScheduleBatch``
and ``ForwardBatch.init_new`` as the scheduler makes them (the path of ``sglang.benchmark.one_batch``).

Each run happens in a fresh spawned process (:func:`run_in_child`): SGLang's runtime context, distributed
group and model registry are process-wide.
"""

from __future__ import annotations

import multiprocessing
import sys
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent


@dataclass
class Request:
    """One prompt: its token ids (image placeholders included) and, for Qwen-VL, each image's pixels and
    ``(t, h, w)`` patch grid."""

    input_ids: list[int]
    pixel_values: list[torch.Tensor]
    grids: list[torch.Tensor]


@dataclass
class Run:
    """What a run produced: ``tokens`` ``(B, steps)`` greedy tokens, ``logits`` one ``(B, V)`` per step,
    ``dropped`` per request the prompt tokens the last layer group no longer holds."""

    tokens: torch.Tensor
    logits: list[torch.Tensor]
    dropped: list[int]


def run_in_child(model_dir: str, method: str, requests: list[Request], steps: int) -> Run:
    """:func:`run` in a spawned process, so that every run starts from a clean SGLang."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(run, (model_dir, method, requests, steps))


def run(model_dir: str, method: str, requests: list[Request], steps: int) -> Run:
    """Prefill ``requests`` as one batch, then decode ``steps - 1`` tokens greedily, with ``--kv-compress
    method`` (its released defaults) on the Qwen-VL model saved in ``model_dir``."""
    sys.path.insert(0, str(TESTS))
    import sglang_env

    sglang_env.install()
    from sglang.benchmark import one_batch
    from sglang.srt.layers.rotary_embedding.mrope import MRotaryEmbedding
    from sglang.srt.managers.mm_schedule import init_mm_embedding_cache
    from sglang.srt.managers.schedule_batch import MultimodalDataItem, MultimodalInputs
    from sglang.srt.models.registry import ModelRegistry, import_model_classes
    from sglang.srt.multimodal.modality import Modality
    from sglang.srt.sampling.sampling_params import SamplingParams
    from sglang.srt.server_args import PortArgs, ServerArgs

    from lightkv_adapters.sglang.settings import SETTINGS_ATTRIBUTE, KVCompressSettings

    ModelRegistry.models.update(import_model_classes("lightkv_adapters.sglang.models"))
    server_args = ServerArgs(
        model_path=model_dir,
        tokenizer_path=model_dir,
        skip_tokenizer_init=True,
        device="cpu",
        attention_backend="torch_native",
        disable_cuda_graph=True,
        disable_radix_cache=True,
        chunked_prefill_size=-1,
        dtype="float32",
        mem_fraction_static=0.05,
        max_total_tokens=4096,
        load_format="safetensors",
    )
    setattr(server_args, SETTINGS_ATTRIBUTE, KVCompressSettings(method=method))
    server_args.resolve_once()
    port_args = PortArgs.init_new(server_args)
    ranks = one_batch.SpawnRanks(world_rank=one_batch.spawn_world_rank(server_args, tp_rank=0, pp_rank=0), gpu_id=0)
    one_batch.publish(server_args, role="scheduler", ranks=ranks)
    one_batch._init_process_global_configs()
    one_batch.get_tokenizer = lambda *args, **kwargs: None  # skip_tokenizer_init: no tokenizer files
    runner, _ = one_batch.load_model(server_args, port_args, 0, 0)
    init_mm_embedding_cache(64 * 1024 * 1024)
    model = runner.torch_runner.model
    config = model.config
    reqs = []
    for index, request in enumerate(requests):
        ids = torch.tensor(request.input_ids)
        items = []
        runs = _runs(ids == config.image_token_id)
        for pixels, grid, (start, end) in zip(request.pixel_values, request.grids, runs, strict=True):
            item = MultimodalDataItem(modality=Modality.IMAGE, feature=pixels, offsets=[(start, end)])
            item.image_grid_thw = grid
            item.set_pad_value()
            items.append(item)
        mm_inputs = None
        if items:
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
            mm_inputs = MultimodalInputs(
                mm_items=items,
                im_token_id=config.image_token_id,
                video_token_id=config.video_token_id,
                mrope_positions=positions.squeeze(1),
                mrope_position_delta=delta,
            )
        padded = array("q", request.input_ids) if mm_inputs is None else model.pad_input_ids(array("q", ids), mm_inputs)
        req = one_batch.Req(
            rid=index,
            origin_input_text="",
            origin_input_ids=padded,
            sampling_params=SamplingParams(temperature=0, max_new_tokens=steps),
        )
        req.multimodal_inputs = mm_inputs
        req.full_untruncated_fill_ids = req.origin_input_ids
        req.logprob_start_len = -1
        req.extend_end = len(padded)
        reqs.append(req)
    with torch.no_grad():
        tokens, logits, batch = runner.extend(reqs)
        all_tokens, all_logits = [tokens], [logits]
        for _ in range(steps - 1):
            tokens, logits = runner.decode(tokens, batch)
            all_tokens.append(tokens)
            all_logits.append(logits)
    groups = getattr(model, "lightkv_groups", None)
    dropped = [0] * len(reqs) if groups is None else groups.dropped_tokens(batch.req_pool_indices)
    return Run(torch.stack(all_tokens, dim=1), all_logits, dropped)


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
