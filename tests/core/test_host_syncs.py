"""One host synchronisation at most per stage, per drop and per eviction, whatever the batch and image count
(counted on CPU by tests/helpers/host_syncs.py), and the counter itself."""

from __future__ import annotations

import pytest
import torch
from helpers.host_syncs import HostSyncCounter

from lightkv_core import VisionSpan, lightkv_stage
from lightkv_core.methods import AirCache, FastV, LookM, PrefixKV, RandomDrop

BACKEND = "triton"  # the path a GPU runs (under TRITON_INTERPRET here)


def batch_of_images(samples: int = 4, images: int = 3, side: int = 8, left: bool = False, seed: int = 0) -> dict:
    """``samples`` prompts of ``images`` ``side x side`` images between text runs, of different lengths, padded."""
    generator = torch.Generator().manual_seed(seed)
    per_sample, lengths = [], []
    for b in range(samples):
        spans, position = [], 3 + b
        for _ in range(images):
            spans.append(VisionSpan(position, position + side * side, side, side))
            position += side * side + 4
        per_sample.append(spans)
        lengths.append(position)
    seq = max(lengths)
    mask = torch.zeros(samples, seq, dtype=torch.bool)
    for b, length in enumerate(lengths):
        if left:
            mask[b, seq - length :] = True
            shift = seq - length
            per_sample[b] = [VisionSpan(s.start + shift, s.end + shift, s.rows, s.cols) for s in per_sample[b]]
        else:
            mask[b, :length] = True
    return dict(
        hidden=torch.randn(samples, seq, 32, generator=generator),
        q=torch.randn(samples, 4, seq, 16, generator=generator),
        k=torch.randn(samples, 2, seq, 16, generator=generator),
        position_ids=(torch.cumsum(mask.long(), 1) - 1).clamp(min=0).expand(3, samples, seq).clone(),
        mask=mask,
        spans=per_sample,
    )


def counted(inputs: dict, run) -> HostSyncCounter:
    with HostSyncCounter() as counter:
        counter.mark(*(inputs[name] for name in ("hidden", "q", "k", "position_ids", "mask")))
        run()
    return counter


# ----------------------------------------------------------------------------------------------
# the counter


def test_counter_counts_reads_of_device_data_only():
    x = torch.arange(6.0)
    host = torch.arange(4)
    with HostSyncCounter() as counter:
        counter.mark(x)
        y = x * 2
        host.tolist(), int(host.sum()), host[host > 1]  # host data: free
        assert counter.count == 0
        float(y.sum())
        y[y > 3]
        y.nonzero()
        y.tolist()
        copy = y.cpu()
        copy.tolist(), int(copy[0])  # the host copy is host data
        moved = host.to(x.device)  # host data copied to the device
        moved.tolist()
        torch.arange(3, device=y.device).tolist()
        torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2]).to(x.device))
    assert dict(counter.reads) == {
        "item": 1,
        "boolean index": 1,
        "nonzero": 1,
        "tolist": 3,
        "cpu": 1,
        "repeat_interleave": 1,
    }
    assert torch.Tensor.to is not None and "device" not in torch.Tensor.__dict__  # patches undone


# ----------------------------------------------------------------------------------------------
# stages and methods


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
@pytest.mark.parametrize("guide", ["all_text", "prompt", "none"])
def test_one_stage_syncs_once(left, guide):
    inputs = batch_of_images(left=left)
    result = {}

    def run():
        result["stage"] = lightkv_stage(
            inputs["hidden"],
            inputs["q"],
            inputs["k"],
            inputs["spans"],
            2,
            0.5,
            guide=guide,
            position_ids=inputs["position_ids"],
            attention_mask=inputs["mask"],
            padding_side="left" if left else "right",
            backend=BACKEND,
        )

    counter = counted(inputs, run)
    assert counter.count <= 1, dict(counter.sites)
    assert bool((result["stage"].merged_into >= 0).any())  # the stage merged something


@pytest.mark.parametrize(
    "method",
    [
        FastV(layer=1, ratio=0.5, backend=BACKEND),
        FastV(layer=1, ratio=0.5, scoring="all_tokens", backend=BACKEND),
        RandomDrop(layer=1, ratio=0.5),
    ],
    ids=["fastv-last", "fastv-all", "random"],
)
def test_one_drop_syncs_once(method):
    inputs = batch_of_images()

    def run():
        method.reduce(
            1,
            inputs["hidden"],
            inputs["q"],
            inputs["k"],
            inputs["spans"],
            position_ids=inputs["position_ids"][0],
            attention_mask=inputs["mask"],
            padding_side="right",
        )

    counter = counted(inputs, run)
    assert counter.count <= 1, dict(counter.sites)


@pytest.mark.parametrize(
    "method",
    [AirCache(retention=0.5, backend=BACKEND), PrefixKV(retention=0.5, backend=BACKEND), LookM(retention=0.5)],
    ids=["aircache", "prefixkv", "lookm"],
)
def test_eviction_observes_without_sync_and_evicts_with_one(method):
    inputs = batch_of_images(samples=2, images=2, left=True)
    q, k, mask, spans = inputs["q"], inputs["k"], inputs["mask"], inputs["spans"]
    layers = 3
    caches = [(k * (i + 1), k - i) for i in range(layers)]
    observations = []
    counter = counted(
        inputs, lambda: observations.extend(method.observe(i, q, k, spans, attention_mask=mask) for i in range(layers))
    )
    assert counter.count == 0, dict(counter.sites)

    with HostSyncCounter() as counter:
        counter.mark(mask, *observations, *(t for cache in caches for t in cache))
        evicted = method.evict(observations, [c[0] for c in caches], [c[1] for c in caches], spans, attention_mask=mask)
    assert counter.count <= 1, dict(counter.sites)
    assert all(layer.keys.shape[2] < k.shape[2] for layer in evicted)
