"""One tensor-parallel rank of the head-sharding test (``tests/methods/test_head_shards.py``): a gloo process group
on 127.0.0.1, the rank's share of the heads, and the method's reduction with :class:`~lightkv_core.shards.HeadShards`.
A module of its own so that spawned processes can import it."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from lightkv_core.shards import HeadShards


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(tensor)
    return tensor


def run_rank(rank: int, world: int, port: int, case_path: str, out_dir: str) -> None:
    """Reduce the case saved at ``case_path`` with this rank's contiguous share of the query and key heads (SGLang's
    split) and save the result to ``out_dir/<rank>.pt``."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        case = torch.load(case_path, weights_only=False)
        q, k = case["q"], case["k"]
        heads, kv_heads = q.shape[1] // world, k.shape[1] // world
        result = case["method"].reduce(
            case["layer"],
            case["hidden"],
            q[:, rank * heads : (rank + 1) * heads],
            k[:, rank * kv_heads : (rank + 1) * kv_heads],
            case["spans"],
            position_ids=case["position_ids"],
            attention_mask=case["attention_mask"],
            padding_side="right",
            head_shards=HeadShards(world, all_reduce_sum),
        )
        torch.save({"hidden": result.hidden, "kept_padded": result.kept_padded}, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()
