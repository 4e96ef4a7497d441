"""SGLang's real model runner on the CPU with ``--kv-compress``, token for token against the Transformers
adapter on the same weights: stock (``none``) equals stock Transformers; LightKV and FastV equal the
Transformers adapter running the same method, through a prefill of three requests (images in two of them,
a text-only one) and decode steps (logits up to float32 rounding, tests/tolerances.py).

Two families: Qwen2.5-VL (SGLang's ``Qwen2_5_VLForConditionalGeneration``, saved as Transformers saves it)
and LLaVA-1.5 (SGLang's ``LlavaLlamaForCausalLM``, which reads the original LLaVA checkpoint format: a
Llama config with ``mm_*`` keys, ``model.mm_projector.*`` weights and the CLIP tower in its own folder).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import pytest
import torch
from helpers import hf_models
from helpers.sglang_runner import Request, run_in_child
from helpers.tolerances import assert_close_rounding, text_model_chain

pytest.importorskip("sglang")

STEPS = 5


@dataclass(frozen=True)
class Family:
    """One model family under test: the tiny model's kind and weight seed, and the batch it runs."""

    kind: str
    seed: int
    samples: tuple[hf_models.Sample, ...]


FAMILIES = {
    # Images big enough that every stage of the released schedule merges (grids of merged tokens 8x10, 10x8).
    "qwen2.5-vl": Family(
        "qwen2.5-vl",
        seed=0,
        samples=(
            hf_models.Sample(images=(hf_models.Image(16, 20),), seed=1),
            hf_models.Sample(images=(hf_models.Image(20, 16),), seed=2, after=3),
            hf_models.Sample(seed=3, after=9),
        ),
    ),
    # 12x12 tokens per image; two images in the first request. Weight seed 2 decodes varied tokens, and
    # LightKV changes some of them.
    "llava": Family(
        "llava",
        seed=2,
        samples=(
            hf_models.Sample(images=(hf_models.Image(), hf_models.Image()), seed=1),
            hf_models.Sample(images=(hf_models.Image(),), seed=2, after=3),
            hf_models.Sample(seed=3, after=9),
        ),
    ),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved(request, tmp_path_factory):
    """The family's tiny model, saved for SGLang, with its Transformers inputs and the SGLang requests."""
    family = FAMILIES[request.param]
    if family.kind == "qwen2.5-vl":
        model = hf_models.build(family.kind, seed=family.seed, qwen_patch=14)  # SGLang's vision encoder needs 14
    else:
        model = hf_models.build(family.kind, seed=family.seed)
    directory = tmp_path_factory.mktemp(family.kind)
    inputs = hf_models.make_inputs(model, family.kind, list(family.samples))
    if family.kind == "llava":
        hf_models.save_original_llava(model, directory)
        requests = _llava_requests(inputs, family.samples)
    else:
        model.save_pretrained(directory)
        requests = _qwen_vl_requests(inputs, family.samples)
    return model, str(directory), inputs, requests


def _qwen_vl_requests(inputs: dict, samples: tuple[hf_models.Sample, ...]) -> list[Request]:
    requests, cursor, image = [], 0, 0
    grids = inputs["image_grid_thw"]
    for sample, ids, real in zip(samples, inputs["input_ids"], inputs["attention_mask"], strict=True):
        pixels, sample_grids = [], []
        for _ in sample.images:
            grid = grids[image : image + 1]
            count = int(grid.prod())
            pixels.append(inputs["pixel_values"][cursor : cursor + count])
            sample_grids.append(grid)
            cursor, image = cursor + count, image + 1
        requests.append(Request(ids[real.bool()].tolist(), pixels, sample_grids))
    return requests


def _llava_requests(inputs: dict, samples: tuple[hf_models.Sample, ...]) -> list[Request]:
    """The prompts as SGLang's LLaVA gets them: one image token per image (Transformers' ids hold a run of
    them per image) and each image's ``(1, 3, H, W)`` pixels."""
    requests, image = [], 0
    for sample, ids, real in zip(samples, inputs["input_ids"], inputs["attention_mask"], strict=True):
        prompt = []
        for token in ids[real.bool()].tolist():
            if token != hf_models.IMAGE or prompt[-1:] != [hf_models.IMAGE]:
                prompt.append(token)
        count = len(sample.images)
        assert prompt.count(hf_models.IMAGE) == count
        pixels = [inputs["pixel_values"][index : index + 1] for index in range(image, image + count)]
        requests.append(Request(prompt, pixels))
        image += count
    return requests


def _transformers(model, inputs: dict, method: str):
    from lightkv_adapters.hf import apply_lightkv, remove_lightkv

    if method != "none":
        apply_lightkv(model, method)
    try:
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
    finally:
        if method != "none":
            remove_lightkv(model)
    return out.sequences[:, inputs["input_ids"].shape[1] :], out.logits


@pytest.mark.parametrize(
    ("method", "pools", "backend"),
    [
        ("none", "shared", "torch_native"),
        ("lightkv", "shared", "torch_native"),
        ("fastv", "shared", "torch_native"),
        ("lightkv", "0.6,0.5,0.4", "torch_native"),
        ("lightkv", "off", "torch_native"),
        ("fastv", "shared", "triton"),  # LightKV on Triton: the live suite's qwen-triton
    ],
)
def test_sglang_matches_transformers(saved, method, pools, backend):
    """Layer groups sharing an arena of pages (``shared``, the default), fixed pools per group (ratios) and the
    single pool (``off``, compute only) all give the Transformers adapter's tokens, so they give the same tokens
    as each other; so do SGLang's Triton attention kernels (run by Triton's interpreter here), whose decode reads
    each group's table through SGLang's KV index translator."""
    model, directory, inputs, requests = saved
    expected_tokens, expected_logits = _transformers(model, inputs, method)
    run = run_in_child(directory, method, requests, STEPS, pools, attention_backend=backend)
    assert torch.equal(run.tokens, expected_tokens)
    # two engines' float32 forwards of one model: they differ by rounding only
    chain = text_model_chain(model.model.language_model.config, inputs["input_ids"].shape[1] + STEPS)
    for step, (got, want) in enumerate(zip(run.logits, expected_logits, strict=True)):
        assert_close_rounding(got, want, chain, msg=f"step {step}")
    if method == "none":
        assert run.dropped == [0, 0, 0]
        return
    # both image requests lost vision tokens in the last group; the text-only one kept all
    assert run.dropped[0] > 0 and run.dropped[1] > 0 and run.dropped[2] == 0
    if pools == "off":
        assert run.pool_sizes == []
        return
    # shared: each group could take the whole arena (its size times its layers is every row but page 0's); fixed:
    # one pool per layer group, later ones smaller. Each request holds its survivors plus its decoded tokens in
    # every later group (the text-only one all its tokens), and releasing them frees every slot (and page).
    sizes = run.pool_sizes
    assert len(sizes) >= 2
    if pools == "shared":
        assert len({size * layers for size, layers in zip(sizes, run.arena_layers, strict=True)}) == 1
    else:
        assert all(later < earlier for earlier, later in zip(sizes, sizes[1:], strict=False))
    prompt_lengths = inputs["attention_mask"].sum(dim=1).tolist()  # every image token, as SGLang pads them
    last = [held[-1] for held in run.held]
    assert last == [n - d + STEPS - 1 for n, d in zip(prompt_lengths, run.dropped, strict=True)]
    assert run.held[2] == [run.held[2][0]] * len(run.held[2])
    assert all(list(held) == sorted(held, reverse=True) for held in run.held)
    assert run.free_after_release == sizes[1:]
    assert run.leaks == []


@pytest.mark.parametrize("method", ["lightkv", "fastv"])
def test_output_logprobs_of_compressed_prompts(saved, method):
    """A request asking for its output tokens' logprobs (``"logprobs": true``) used to bring the scheduler down
    (the compressed view asked for input logprobs of every kept token); it now runs as without logprobs."""
    model, directory, inputs, requests = saved
    expected_tokens, _ = _transformers(model, inputs, method)
    run = run_in_child(directory, method, requests, 2, "shared", logprobs=True)
    assert torch.equal(run.tokens, expected_tokens[:, :2])
    assert run.dropped[0] > 0 and run.leaks == []


#: The pools each family's decode-graph tests run with: layer-group pools (the groups' lengths come from them) and the
#: single pool (the groups' tables are written at each step); fixed pools read their lengths as the arena does.
GRAPH_POOLS = {"qwen2_5_vl": "shared", "llava": "off"}


def test_decode_cuda_graph_replays_read_what_eager_decode_reads(saved):
    """LightKV decoding through SGLang's decode CUDA graphs on the triton backend, capture and replay emulated on
    the CPU (tests/helpers/graph_replay.py: SGLang's fixed buffers, padded batches, its replay-side metadata calls;
    a replay reruns the captured forward with the tables and the pools' lengths poisoned). At every step each
    layer group's buffers and attention metadata equal what the eager decode reads, and the tokens are the
    Transformers adapter's, while the batch shrinks from three requests (padded to a graph of four) to two."""
    model, directory, inputs, requests = saved
    expected_tokens, expected_logits = _transformers(model, inputs, "lightkv")
    pools = GRAPH_POOLS[model.config.model_type]
    run = run_in_child(
        directory, "lightkv", requests, STEPS, pools, attention_backend="triton", decode="graph", leave_after=2
    )
    assert run.graph_mismatches == []
    stayed = [0, 2]
    assert torch.equal(run.tokens[stayed], expected_tokens[stayed])
    assert torch.equal(run.tokens[1, :3], expected_tokens[1, :3]) and (run.tokens[1, 3:] == -1).all()
    chain = text_model_chain(model.model.language_model.config, inputs["input_ids"].shape[1] + STEPS)
    for step, (got, want) in enumerate(zip(run.logits, expected_logits, strict=True)):
        rows = [0, 1, 2] if step < 3 else stayed
        assert_close_rounding(got[rows], want[rows], chain, msg=f"step {step}")


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("sgl_kernel") is None,
    reason="needs a CUDA device and SGLang's CUDA kernels, sgl_kernel (scripts/gpu-check.sh runs it)",
)
def test_decode_cuda_graphs_on_a_gpu_answer_as_the_eager_decode(saved):
    """The GPU run of the test above: SGLang captures and replays real decode CUDA graphs (batch sizes 1, 2 and 4,
    triton backend), and LightKV answers as the eager decode on the same GPU, while the batch shrinks."""
    model, directory, _, requests = saved
    pools = GRAPH_POOLS[model.config.model_type]
    kwargs = dict(attention_backend="triton", device="cuda", leave_after=2)
    eager = run_in_child(directory, "lightkv", requests, STEPS, pools, **kwargs)
    graph = run_in_child(directory, "lightkv", requests, STEPS, pools, decode="cuda_graph", **kwargs)
    assert torch.equal(graph.tokens, eager.tokens)
    for step, (got, want) in enumerate(zip(graph.logits, eager.logits, strict=True)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, equal_nan=True, msg=f"step {step}")
