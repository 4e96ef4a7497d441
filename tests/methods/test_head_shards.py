"""Tensor parallelism in the methods (``lightkv_core.shards.HeadShards``): two gloo processes, each holding half of
the query and key heads (GQA included), sum their partial guide scores and make the same decisions as one process
holding every head, on the same hidden states."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from helpers.head_shards import run_rank

from lightkv_core.config import LightKVConfig
from lightkv_core.methods import FastV, LightKV, RandomDrop
from lightkv_core.shards import HeadShards

WORLD = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_case(method, seed: int) -> dict:
    """Two samples: a 6x6 image between text (and a right-padded shorter one with a 4x4 image), 4 query heads over
    2 key heads."""
    generator = torch.Generator().manual_seed(seed)
    batch, seq, dim, heads, kv_heads, head_dim = 2, 48, 16, 4, 2, 8
    mask = torch.ones(batch, seq, dtype=torch.bool)
    mask[1, 40:] = False
    return {
        "method": method,
        "layer": method.reduce_layers[0],
        "hidden": torch.randn(batch, seq, dim, generator=generator),
        "q": torch.randn(batch, heads, seq, head_dim, generator=generator),
        "k": torch.randn(batch, kv_heads, seq, head_dim, generator=generator),
        "spans": [[(4, 40, 6, 6)], [(3, 19, 4, 4)]],
        "position_ids": torch.arange(seq).expand(batch, seq).clone(),
        "attention_mask": mask,
    }


@pytest.mark.parametrize(
    "method",
    [
        LightKV(LightKVConfig((0,), (2,), (0.5,))),
        LightKV(LightKVConfig((0,), (1,), (0.25,), guide="prompt")),
        FastV(0, 0.5),
        FastV(0, 0.5, scoring="last_token"),
        RandomDrop(0, 0.5),
    ],
    ids=["lightkv", "lightkv-prompt-guide", "fastv", "fastv-last-token", "random"],
)
def test_two_ranks_decide_as_one_process_with_every_head(method, tmp_path):
    case = make_case(method, seed=7)
    torch.save(case, tmp_path / "case.pt")
    mp.spawn(run_rank, args=(WORLD, free_port(), str(tmp_path / "case.pt"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]
    whole = method.reduce(
        case["layer"],
        case["hidden"],
        case["q"],
        case["k"],
        case["spans"],
        position_ids=case["position_ids"],
        attention_mask=case["attention_mask"],
        padding_side="right",
    )
    assert torch.equal(ranks[0]["kept_padded"], ranks[1]["kept_padded"])
    assert torch.equal(ranks[0]["hidden"], ranks[1]["hidden"])
    assert torch.equal(ranks[0]["kept_padded"], whole.kept_padded)
    torch.testing.assert_close(ranks[0]["hidden"], whole.hidden, rtol=1e-5, atol=1e-6)
    assert (whole.kept_padded[0] >= 0).sum() < 48  # something was merged or dropped


def test_one_rank_is_the_identity_and_bad_rank_counts_are_refused():
    scores = torch.rand(2, 5)
    shards = HeadShards(1, lambda t: t)
    assert torch.equal(shards.sum(scores), scores) and torch.equal(shards.mean(scores), scores)
    for ranks in (0, -2, True, 2.0):
        with pytest.raises(ValueError, match="HeadShards.ranks must be an integer >= 1"):
            HeadShards(ranks, lambda t: t)
