"""The transformers adapter's bookkeeping reads the device a fixed number of times per prefill, whatever the batch:
once for the prompt's ids, once for the Qwen grids, once for the padding side, once per stage, once for the stats.
Counted on CPU (tests/helpers/host_syncs.py) against the stock model's own forward."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers.hf_cases import batch_of_two, released
from helpers.hf_models import Sample, build, make_inputs
from helpers.host_syncs import HostSyncCounter

from lightkv_adapters.hf import lightkv


def prefill_syncs(model: torch.nn.Module, inputs: dict) -> int:
    with torch.no_grad(), HostSyncCounter() as counter:
        counter.mark(*inputs.values(), *model.parameters(), *model.buffers())
        model(**inputs)
    return counter.count


@pytest.mark.parametrize("kind", ["llava", "qwen2.5-vl"])
def test_adapter_reads_the_device_a_fixed_number_of_times_per_prefill(kind: str) -> None:
    model = build(kind)
    config = released(kind)
    samples = batch_of_two(kind)
    larger = [*samples, *(replace(sample, seed=index + 5) for index, sample in enumerate(samples))]
    added = {}
    for name, batch in (("two", samples), ("four", larger)):
        inputs = make_inputs(model, kind, batch)
        stock = prefill_syncs(model, inputs)
        with lightkv(model, config, backend="triton"):
            added[name] = prefill_syncs(model, inputs) - stock
    per_prefill = 3 if kind == "qwen2.5-vl" else 2  # ids and mask in one copy, (grids,), stats
    assert added["two"] == added["four"] == len(config.merge_layers) + per_prefill, added


def test_text_only_prompt_adds_no_stage_reads() -> None:
    model = build("llava")
    inputs = make_inputs(model, "llava", [Sample((), before=5, after=4)])
    stock = prefill_syncs(model, inputs)
    with lightkv(model, released("llava"), backend="triton"):
        assert prefill_syncs(model, inputs) - stock <= 3
