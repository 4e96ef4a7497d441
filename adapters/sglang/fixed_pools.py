"""Fixed KV pools per layer group (``--kv-compress-pool-ratios a,b,c``): :func:`pool_sizes` splits the memory of a
single pool at given ratios, :class:`LayerGroupKVPool` holds each group's K/V in its own SGLang pool. For a server
whose mix of image and text requests is known and fixed; the default shares one arena of pages between the groups
(:mod:`~lightkv_adapters.sglang.arena`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from sglang.srt.mem_cache.memory_pool import KVCache as SGLangKVCache
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool


def check_pool_ratios(ratios: Sequence[float], groups: int) -> None:
    """Raises ``ValueError`` unless there is one ratio in ``(0, 1]`` per group after the first."""
    if len(ratios) != groups - 1:
        raise ValueError(
            f"--kv-compress-pool-ratios needs one ratio per layer group after the first ({groups - 1}), got "
            f"{len(ratios)}: {tuple(ratios)}"
        )
    if any(not 0.0 < ratio <= 1.0 for ratio in ratios):
        raise ValueError(f"--kv-compress-pool-ratios must lie in (0, 1], got {tuple(ratios)}")


def pool_sizes(tokens: int, group_layer_counts: Sequence[int], ratios: Sequence[float]) -> list[int]:
    """Slots per group for the memory of a single pool of ``tokens`` slots in every layer.

    A slot of group ``g`` costs ``group_layer_counts[g]`` layer-slots, so group 0 gets
    ``floor(tokens * L / (L_0 + sum_g ratio_g * L_g))`` slots and group ``g`` ``floor(ratio_g * size_0)``;
    the total never exceeds ``tokens * L`` layer-slots.
    """
    check_pool_ratios(ratios, len(group_layer_counts))
    weights = [1.0, *ratios]
    cost = sum(weight * count for weight, count in zip(weights, group_layer_counts, strict=True))
    size0 = int(tokens * sum(group_layer_counts) // cost)
    sizes = [size0, *(int(ratio * size0) for ratio in ratios)]
    while sum(size * count for size, count in zip(sizes, group_layer_counts, strict=True)) > tokens * sum(
        group_layer_counts
    ):
        sizes = [size - 1 for size in sizes]
    return sizes


class LayerGroupKVPool(SGLangKVCache):
    """K/V storage of a decoder whose layer groups have pools of different sizes.

    Args:
        sizes: slots per group (group 0 first).
        groups: the layer ids of each group.
        dtype, head_num, head_dim, v_head_dim, device: as SGLang's ``MHATokenToKVPool``.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        groups: Sequence[Sequence[int]],
        dtype: torch.dtype,
        head_num: int,
        head_dim: int,
        v_head_dim: int,
        device: str,
    ) -> None:
        self.size = sizes[0]
        self.sizes = list(sizes)
        self.page_size = 1
        self.dtype = dtype
        self.device = device
        self.head_num = head_num
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim
        self.layer_num = sum(len(layers) for layers in groups)
        self.start_layer = 0
        self.end_layer = self.layer_num - 1
        self.layer_transfer_counter = None
        self.sub_pools = []
        #: layer id -> (group, layer index inside the group's sub-pool)
        self.layers_mapping: dict[int, tuple[int, int]] = {}
        for group, (size, layers) in enumerate(zip(sizes, groups, strict=True)):
            pool = MHATokenToKVPool(
                size=size,
                page_size=1,
                dtype=dtype,
                head_num=head_num,
                head_dim=head_dim,
                layer_num=len(layers),
                device=device,
                enable_memory_saver=False,
                v_head_dim=v_head_dim,
                allocation_label=f"lightkv group {group}",
            )
            pool.model_layer_ids = tuple(layers)
            self.sub_pools.append(pool)
            for index, layer in enumerate(layers):
                self.layers_mapping[layer] = (group, index)
        k_size, v_size = self.get_kv_size_bytes()
        self.mem_usage = (k_size + v_size) / (1 << 30)

    def _pool(self, layer_id: int) -> tuple[MHATokenToKVPool, int]:
        group, index = self.layers_mapping[layer_id]
        return self.sub_pools[group], index

    def get_kv_size_bytes(self) -> tuple[int, int]:
        sizes = [pool.get_kv_size_bytes() for pool in self.sub_pools]
        return sum(k for k, _ in sizes), sum(v for _, v in sizes)

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        pool, index = self._pool(layer_id)
        return pool.get_key_buffer(index)

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        pool, index = self._pool(layer_id)
        return pool.get_value_buffer(index)

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        pool, index = self._pool(layer_id)
        return pool.get_kv_buffer(index)

    def get_v_head_dim(self) -> int:
        return self.v_head_dim

    def set_kv_buffer(
        self,
        layer: object,
        loc: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> None:
        """Write ``layer``'s K/V at ``loc``: slots of the layer's group (the forward batch a group's layers get
        carries that group's slots in ``out_cache_loc``)."""
        pool, index = self._pool(layer.layer_id)
        pool.set_kv_buffer(None, loc, cache_k, cache_v, k_scale, v_scale, layer_id_override=index)
