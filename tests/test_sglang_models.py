"""SGLang's real model runner on the CPU with ``--kv-compress``, token for token against the Transformers
adapter on the same weights: stock (``none``) equals stock Transformers; LightKV and FastV equal the
Transformers adapter running the same method, through a prefill of two requests with different images and
decode steps (logits to 1e-5)."""

from __future__ import annotations

import hf_models
import pytest
import torch
from sglang_runner import Request, run_in_child

pytest.importorskip("sglang")

STEPS = 5
KIND = "qwen2.5-vl"
#: Images big enough that every stage of the released schedule merges (grids of merged tokens 8x10, 10x8).
SAMPLES = [
    hf_models.Sample(images=(hf_models.Image(16, 20),), seed=1),
    hf_models.Sample(images=(hf_models.Image(20, 16),), seed=2, after=3),
    hf_models.Sample(seed=3, after=9),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The tiny Qwen2.5-VL (patch 14, as SGLang's vision encoder expects), saved, with its inputs."""
    model = hf_models.build(KIND, qwen_patch=14)
    directory = tmp_path_factory.mktemp("qwen25vl")
    model.save_pretrained(directory)
    inputs = hf_models.make_inputs(model, KIND, SAMPLES)
    return model, str(directory), inputs


def _requests(inputs: dict) -> list[Request]:
    requests, cursor, image = [], 0, 0
    grids = inputs["image_grid_thw"]
    for sample, ids, real in zip(SAMPLES, inputs["input_ids"], inputs["attention_mask"], strict=True):
        pixels, sample_grids = [], []
        for _ in sample.images:
            grid = grids[image : image + 1]
            count = int(grid.prod())
            pixels.append(inputs["pixel_values"][cursor : cursor + count])
            sample_grids.append(grid)
            cursor, image = cursor + count, image + 1
        requests.append(Request(ids[real.bool()].tolist(), pixels, sample_grids))
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


@pytest.mark.parametrize("method", ["none", "lightkv", "fastv"])
def test_sglang_matches_transformers(saved, method):
    model, directory, inputs = saved
    expected_tokens, expected_logits = _transformers(model, inputs, method)
    run = run_in_child(directory, method, _requests(inputs), STEPS)
    assert torch.equal(run.tokens, expected_tokens)
    for step, (got, want) in enumerate(zip(run.logits, expected_logits, strict=True)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"step {step}")
    if method == "none":
        assert run.dropped == [0, 0, 0]
    else:  # both image requests lost vision tokens in the last group; the text-only one kept all
        assert run.dropped[0] > 0 and run.dropped[1] > 0 and run.dropped[2] == 0
