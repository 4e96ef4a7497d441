"""Layer-group KV pools: each group of layers between two reduce layers gets its own, smaller pool of KV slots.

:class:`LayerGroupKVPool` holds the K/V storage, :class:`LayerGroupCache` (SGLang's auxiliary cache of the
``ReqToTokenPool``) the slots of groups ``1..`` per request row, :class:`LayerGroupAllocator` the scheduler's
allocator over group 0, and :func:`install_pools` puts them in place of a model runner's single pool, with the
same memory. The scheduler hooks that drive them are in :mod:`~lightkv_adapters.sglang.admission`; how slots are
planned, reserved and freed: README (SGLang, Memory).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import KVCache as SGLangKVCache
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from lightkv_core.methods import PrefillReduction
from lightkv_core.plan import LengthPlan
from lightkv_core.spans import VisionSpan

#: The request default pool ratios are derived from: LLaVA-NeXT's five 24x24 grids and 100 text tokens
#: (vision-dominated, 2,880 vision tokens), and the slots it keeps for its decoded tokens (one per group each).
DEFAULT_RATIO_IMAGES, DEFAULT_RATIO_GRID, DEFAULT_RATIO_TEXT, DEFAULT_RATIO_DECODE = 5, 24, 100, 128


def layer_groups(reduce_layers: Sequence[int], num_layers: int) -> list[list[int]]:
    """The decoder's layers split after each reduce layer: ``num_reduce + 1`` lists of layer ids."""
    bounds = [0, *(layer + 1 for layer in reduce_layers), num_layers]
    return [list(range(start, end)) for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


def default_pool_ratios(method: PrefillReduction) -> tuple[float, ...]:
    """Slots of group ``g >= 1`` per slot of group 0 that a vision-dominated request holds: LLaVA-NeXT-like (five
    24x24 images and 100 text tokens) from the method's plan (its upper bound where the plan is inexact), plus 128
    decoded tokens, which take a slot in every group (so the later groups' share is more than the prompt's)."""
    grid = DEFAULT_RATIO_GRID * DEFAULT_RATIO_GRID
    spans = [
        VisionSpan(i * grid, (i + 1) * grid, DEFAULT_RATIO_GRID, DEFAULT_RATIO_GRID)
        for i in range(DEFAULT_RATIO_IMAGES)
    ]
    seq_len = DEFAULT_RATIO_IMAGES * grid + DEFAULT_RATIO_TEXT
    plan = method.plan_lengths(spans, seq_len)
    held = [length + DEFAULT_RATIO_DECODE for length in plan.lengths]
    return tuple(length / held[0] for length in held[1:])


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


class LayerGroupCache:
    """Slots of layer groups ``1..G-1`` per request-pool row: an allocator and a request-to-token table per group.

    Args:
        req_to_token_pool: SGLang's ``ReqToTokenPool`` (its rows and context length size the tables).
        allocators: one allocator per group after the first.
        planner: ``planner(req, seq_len)``: the request's :class:`~lightkv_core.plan.LengthPlan` for a prompt of
            ``seq_len`` tokens.
        full_capacity: slots of group 0 (what SGLang schedules against).
    """

    def __init__(
        self,
        req_to_token_pool: object,
        allocators: Sequence[TokenToKVPoolAllocator],
        planner: Callable[[object, int], LengthPlan],
        full_capacity: int,
    ) -> None:
        rows, width = req_to_token_pool.req_to_token.shape
        device = req_to_token_pool.req_to_token.device
        self.allocators = list(allocators)
        self.planner = planner
        self.dense_capacity = full_capacity
        #: per group after the first: (rows, context) slots of the tokens each row holds in that group
        self.tables = [torch.zeros(rows, width, dtype=torch.int32, device=device) for _ in self.allocators]
        #: (groups - 1, rows) tokens each row holds in each group
        self.lengths = torch.zeros(len(self.allocators), rows, dtype=torch.int64)
        #: (rows,) tokens each row holds in group 0 (0: the row is free)
        self.full_lengths = torch.zeros(rows, dtype=torch.int64)
        self._expected: list = []

    # ---- what SGLang calls ------------------------------------------------------------------------------------

    def expect(self, reqs: Sequence) -> None:
        """The requests of the prefill batch whose rows :meth:`alloc_to_lengths` is about to get, in order."""
        self._expected = list(reqs)

    def alloc_to_lengths(self, *, req_pool_indices_cpu: torch.Tensor, target_seq_lens_cpu: torch.Tensor) -> None:
        """Grow each row to ``target`` tokens in group 0: a new row (prefill) gets its plan's tokens in every
        group, a row that already holds tokens gets one slot per group per new token.

        Raises:
            RuntimeError if a group has too few free slots (nothing is allocated then), or a new row has no
            request to plan from.
        """
        rows = [int(row) for row in req_pool_indices_cpu.tolist()]
        targets = [int(n) for n in target_seq_lens_cpu.tolist()]
        expected, self._expected = self._expected, []
        wanted = self.lengths[:, rows].clone()
        for i, (row, target) in enumerate(zip(rows, targets, strict=True)):
            held = int(self.full_lengths[row])
            if held == 0:
                if len(expected) != len(rows):
                    raise RuntimeError(
                        f"lightkv layer-group pools: row {row} starts a prefill without its request (got "
                        f"{len(expected)} requests for {len(rows)} rows)"
                    )
                plan = self.planner(expected[i], target)
                wanted[:, i] = torch.tensor(plan.lengths[1:], dtype=torch.int64)
            else:
                wanted[:, i] += target - held
        counts = wanted - self.lengths[:, rows]
        allocated = []
        try:
            for group, allocator in enumerate(self.allocators):
                need = int(counts[group].sum())
                slots = allocator.alloc(need) if need > 0 else None
                if need > 0 and slots is None:
                    raise RuntimeError(
                        f"lightkv layer group {group + 1} pool is out of slots: {need} needed, "
                        f"{allocator.available_size()} free (raise --kv-compress-pool-ratios for this group)"
                    )
                allocated.append(slots)
        except RuntimeError:
            for group, slots in enumerate(allocated):
                if slots is not None:
                    self.allocators[group].free(slots)
            raise
        for group, slots in enumerate(allocated):
            if slots is None:
                continue
            offset = 0
            for i, row in enumerate(rows):
                start, end = int(self.lengths[group, row]), int(wanted[group, i])
                self.tables[group][row, start:end] = slots[offset : offset + end - start].to(torch.int32)
                offset += end - start
        self.lengths[:, rows] = wanted
        self.full_lengths[rows] = torch.tensor(targets, dtype=torch.int64)

    def free(self, row: int) -> None:
        """Give back every slot ``row`` holds, in every group (SGLang frees the row: finish, abort, retraction)."""
        for group, allocator in enumerate(self.allocators):
            length = int(self.lengths[group, row])
            if length:
                allocator.free(self.tables[group][row, :length].to(torch.int64))
        self.lengths[:, row] = 0
        self.full_lengths[row] = 0

    def clear(self) -> None:
        """Every slot free, every row empty (SGLang clears the pools)."""
        for allocator in self.allocators:
            allocator.clear()
        self.lengths.zero_()
        self.full_lengths.zero_()
        self._expected = []

    def reset_allocator(self) -> None:
        self.clear()

    # ---- what the forward calls ------------------------------------------------------------------------------

    def trim(self, group: int, row: int, length: int) -> None:
        """Row ``row`` holds ``length`` tokens in group ``group`` (``>= 1``) after a reduction: the slots
        reserved past them go back to the group's pool.

        Raises:
            RuntimeError if the reduction kept more tokens than the row holds slots for (a plan that was not an
            upper bound).
        """
        held = int(self.lengths[group - 1, row])
        if length > held:
            raise RuntimeError(
                f"lightkv planned {held} tokens for row {row} in layer group {group} but the reduction kept {length}"
            )
        if length < held:
            self.allocators[group - 1].free(self.tables[group - 1][row, length:held].to(torch.int64))
            self.lengths[group - 1, row] = length

    # ---- checks ----------------------------------------------------------------------------------------------

    def available(self) -> list[int]:
        """Free slots of each group after the first."""
        return [allocator.available_size() for allocator in self.allocators]

    def state(self) -> list[dict[str, int]]:
        """Per group after the first: its pool's ``size`` and ``free`` slots (what ``/server_info`` reports, see
        :func:`lightkv_adapters.sglang.admission.pool_state_hook`)."""
        return [{"size": int(allocator.size), "free": int(allocator.available_size())} for allocator in self.allocators]

    def leaks(self) -> list[str]:
        """One message per group whose slots are not exactly the free ones plus the rows' ones, each once."""
        problems = []
        for group, allocator in enumerate(self.allocators):
            owned = torch.cat(
                [self.tables[group][row, :length].to(torch.int64) for row, length in enumerate(self.lengths[group])]
                or [torch.zeros(0, dtype=torch.int64)]
            )
            free = torch.cat([allocator.free_pages, allocator.release_pages]).cpu()
            every = torch.cat([owned.cpu(), free])
            expected = torch.arange(1, allocator.size + 1)
            if every.numel() != allocator.size or not torch.equal(torch.sort(every).values, expected):
                problems.append(
                    f"lightkv layer group {group + 1} pool: {owned.numel()} slots held by rows + {free.numel()} free "
                    f"!= {allocator.size}, or a slot is held twice"
                )
        return problems


class LayerGroupAllocator(TokenToKVPoolAllocator):
    """SGLang's token allocator over group 0 whose decode-capacity check asks every group."""

    groups: LayerGroupCache | None = None

    def check_decode_capacity(self, *, num_tokens: int, tree_cache, requests=None, spec_algorithm=None) -> bool:
        fits = super().check_decode_capacity(
            num_tokens=num_tokens, tree_cache=tree_cache, requests=requests, spec_algorithm=spec_algorithm
        )
        return fits and all(free >= num_tokens for free in self.groups.available())


def group_demand(groups: LayerGroupCache, req: object, max_new_tokens: int) -> list[int]:
    """Slots a new request needs in each group after the first: its planned prompt tokens, its decode budget
    and one spare slot."""
    seq_len = len(req.full_untruncated_fill_ids)
    plan = groups.planner(req, seq_len)
    return [length + max_new_tokens + 1 for length in plan.lengths[1:]]


def admits(groups: LayerGroupCache, demand: Sequence[int], reserved: Sequence[int]) -> bool:
    """Whether every group has ``demand`` free slots beyond what is ``reserved`` (admitted or decoding work)."""
    return all(need <= free - held for need, free, held in zip(demand, groups.available(), reserved, strict=True))


def install_pools(model_runner: object, ratios: Sequence[float] | None) -> LayerGroupCache | None:
    """Replace ``model_runner``'s single KV pool by layer-group pools of the same memory.

    Args:
        model_runner: SGLang's ``ModelRunner`` right after it allocated its pools (``token_to_kv_pool``,
            ``token_to_kv_pool_allocator``, ``req_to_token_pool``, ``max_total_num_tokens``); its model carries
            ``lightkv_groups`` (a :class:`~lightkv_adapters.sglang.models.grouped.LayerGroups`).
        ratios: tokens of each group after the first per token of group 0; ``None``: :func:`default_pool_ratios`.

    Returns:
        The :class:`LayerGroupCache` attached to the request-to-token pool, or ``None`` if the model compresses
        nothing.
    """
    layer_groups_of_model = getattr(model_runner.model, "lightkv_groups", None)
    if layer_groups_of_model is None:
        return None
    stock = model_runner.token_to_kv_pool
    if type(stock) is not MHATokenToKVPool or stock.page_size != 1:
        raise NotImplementedError(
            f"lightkv layer-group pools replace SGLang's MHATokenToKVPool with page size 1, not "
            f"{type(stock).__name__} with page size {stock.page_size}"
        )
    method = layer_groups_of_model.method
    groups = layer_groups(method.reduce_layers, stock.layer_num)
    ratios = tuple(ratios) if ratios is not None else default_pool_ratios(method)
    sizes = pool_sizes(stock.size, [len(layers) for layers in groups], ratios)
    settings = dict(dtype=stock.dtype, head_num=stock.head_num, head_dim=stock.head_dim, v_head_dim=stock.v_head_dim)
    device, need_sort = stock.device, model_runner.token_to_kv_pool_allocator.need_sort
    model_runner.token_to_kv_pool = model_runner.token_to_kv_pool_allocator = stock = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    kv_pool = LayerGroupKVPool(sizes, groups, device=device, **settings)
    allocator = LayerGroupAllocator(sizes[0], settings["dtype"], device, kv_pool, need_sort)
    allocators = [
        TokenToKVPoolAllocator(size, settings["dtype"], device, sub_pool, need_sort)
        for size, sub_pool in zip(sizes[1:], kv_pool.sub_pools[1:], strict=True)
    ]
    planner = layer_groups_of_model.plan_request
    cache = LayerGroupCache(model_runner.req_to_token_pool, allocators, planner, sizes[0])
    allocator.groups = cache
    model_runner.req_to_token_pool.attach_aux_cache(cache)
    model_runner.token_to_kv_pool = kv_pool
    model_runner.token_to_kv_pool_allocator = allocator
    model_runner.max_total_num_tokens = sizes[0]
    if getattr(model_runner, "memory_pool_config", None) is not None:
        model_runner.memory_pool_config.max_total_num_tokens = sizes[0]
    layer_groups_of_model.pools = cache
    return cache
