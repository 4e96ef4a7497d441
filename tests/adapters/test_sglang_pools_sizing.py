"""Layer-group KV pools (``lightkv_adapters.sglang.pools``) on SGLang's real classes (CPU), sizing and
allocation: the cache's clear and trim outside the scheduler, the layer groups and pool sizes of a split (one
property-based), the default and checked pool ratios, and the ``--kv-compress-pool-ratios`` flag and ``Engine``
keyword.
"""

from __future__ import annotations

import argparse
import importlib.util

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

if importlib.util.find_spec("sglang") is None:
    pytest.skip("SGLang is not installed", allow_module_level=True)

from lightkv_adapters.sglang import cpu_env  # noqa: E402

cpu_env.install()

from helpers.sglang_pools import NUM_LAYERS, build_pools, halving_planner  # noqa: E402

from lightkv_adapters.sglang.fixed_pools import check_pool_ratios, pool_sizes  # noqa: E402
from lightkv_adapters.sglang.pools import layer_groups  # noqa: E402
from lightkv_adapters.sglang.settings import add_kv_compress_args, kv_compress_settings  # noqa: E402

# --- the cache outside the scheduler -------------------------------------------------------------------------------


def test_clearing_the_request_pool_empties_every_group() -> None:
    """SGLang's ``ReqToTokenPool.clear`` clears the attached cache: every row empty, every slot free."""
    pool, _, cache = build_pools([1000, 500, 250], halving_planner)
    rows = pool.alloc_rows(2)
    cache.expect([object(), object()])
    pool.alloc_aux_to_lengths(req_pool_indices_cpu=torch.tensor(rows), target_seq_lens_cpu=torch.tensor([40, 80]))
    assert cache.available() == [440, 220]
    pool.clear()
    assert cache.available() == [500, 250]
    assert not cache.lengths.any() and not cache.full_lengths.any()
    assert cache.leaks() == []


def test_trim_past_the_plan_raises() -> None:
    """A reduction that kept more tokens than the plan reserved (a plan that was not an upper bound) is an
    error, and leaves the row as it was."""
    pool, _, cache = build_pools([100, 50, 25], halving_planner)
    (row,) = pool.alloc_rows(1)
    cache.expect([object()])
    pool.alloc_aux_to_lengths(req_pool_indices_cpu=torch.tensor([row]), target_seq_lens_cpu=torch.tensor([40]))
    with pytest.raises(RuntimeError, match="planned 10 tokens for row .* in layer group 2 but the reduction kept 11"):
        cache.trim(2, row, 11)
    assert cache.lengths[:, row].tolist() == [20, 10]
    assert cache.available() == [30, 15]


# --- pool sizes --------------------------------------------------------------------------------------------------


def test_layer_groups_split_after_each_reduce_layer() -> None:
    """LLaVA's LightKV layers 12/18/24 of 32, FastV after layer 2 of 5, and the state machine's split."""
    assert [len(group) for group in layer_groups((12, 18, 24), 32)] == [13, 6, 6, 7]
    assert layer_groups((2,), 5) == [[0, 1, 2], [3, 4]]
    assert layer_groups((3, 4, 6), NUM_LAYERS) == [[0, 1, 2, 3], [4], [5, 6], [7]]


def test_pool_sizes_of_llava_spend_the_stock_memory_on_more_tokens() -> None:
    """LLaVA's 32 layers split 13/6/6/7 by LightKV: group 0 holds about 1.7x the stock pool's tokens."""
    tokens, counts, ratios = 100_000, [13, 6, 6, 7], (0.52, 0.28, 0.16)
    sizes = pool_sizes(tokens, counts, ratios)
    assert sum(size * count for size, count in zip(sizes, counts, strict=True)) <= tokens * 32
    assert sizes[0] == pytest.approx(tokens * 32 / (13 + 0.52 * 6 + 0.28 * 6 + 0.16 * 7), abs=1)
    assert 1.65 < sizes[0] / tokens < 1.75
    assert sizes[1:] == [int(ratio * sizes[0]) for ratio in ratios]


@given(
    tokens=st.integers(1, 10**6),
    counts=st.lists(st.integers(1, 16), min_size=2, max_size=5),
    data=st.data(),
)
def test_pool_sizes_never_exceed_the_stock_budget(tokens: int, counts: list[int], data: st.DataObject) -> None:
    """Any split: the groups' layer-slots fit the stock pool's, group 0 never holds fewer tokens than the stock
    pool, and rounding wastes less than two tokens' worth of every layer."""
    ratios = data.draw(
        st.lists(st.floats(0.0, 1.0, exclude_min=True), min_size=len(counts) - 1, max_size=len(counts) - 1)
    )
    sizes = pool_sizes(tokens, counts, ratios)
    used = sum(size * count for size, count in zip(sizes, counts, strict=True))
    assert tokens * sum(counts) - 2 * sum(counts) < used <= tokens * sum(counts)
    assert sizes[0] >= tokens
    assert all(0 <= size <= ratio * sizes[0] for size, ratio in zip(sizes[1:], ratios, strict=True))


@pytest.mark.parametrize(
    ("ratios", "message"),
    [
        ((0.5, 0.3), r"one ratio per layer group after the first \(3\), got 2"),
        ((0.5, 0.3, 0.2, 0.1), r"one ratio per layer group after the first \(3\), got 4"),
        ((0.5, 0.0, 0.2), r"must lie in \(0, 1\]"),
        ((0.5, 1.5, 0.2), r"must lie in \(0, 1\]"),
        ((-0.1, 0.3, 0.2), r"must lie in \(0, 1\]"),
    ],
)
def test_check_pool_ratios_rejects(ratios: tuple[float, ...], message: str) -> None:
    """Four layer groups need three ratios, each in ``(0, 1]``."""
    with pytest.raises(ValueError, match=r"--kv-compress-pool-ratios .*" + message):
        check_pool_ratios(ratios, 4)


def test_check_pool_ratios_accepts_one_ratio_in_range_per_later_group() -> None:
    """One ratio in ``(0, 1]`` per later group (none for a single group) passes."""
    check_pool_ratios((1.0, 0.5, 1e-3), 4)
    check_pool_ratios((), 1)


# --- --kv-compress-pool-ratios -------------------------------------------------------------------------------------


def _parse(*flags: str) -> dict:
    """The ``--kv-compress*`` flags parsed by a parser that ``add_kv_compress_args`` set up."""
    parser = argparse.ArgumentParser()
    add_kv_compress_args(parser)
    return vars(parser.parse_args(list(flags)))


@pytest.mark.parametrize(
    ("flags", "grouped_pools", "pool_ratios"),
    [
        ((), True, None),
        (("--kv-compress-pool-ratios", "shared"), True, None),
        (("--kv-compress-pool-ratios", " SHARED "), True, None),
        (("--kv-compress-pool-ratios", "off"), False, None),
        (("--kv-compress-pool-ratios", "0.5,0.3,0.2"), True, (0.5, 0.3, 0.2)),
        (("--kv-compress-pool-ratios", "1"), True, (1.0,)),
    ],
)
def test_pool_ratios_flag(flags: tuple[str, ...], grouped_pools: bool, pool_ratios: tuple | None) -> None:
    """``shared`` (the default) gives the groups one arena of pages, ``off`` keeps one pool, a list gives fixed pools
    of those ratios."""
    settings = kv_compress_settings(**_parse("--kv-compress", "lightkv", *flags))
    assert (settings.grouped_pools, settings.pool_ratios) == (grouped_pools, pool_ratios)


def test_unparsable_pool_ratios_are_usage_errors(capsys: pytest.CaptureFixture) -> None:
    """A value that is neither a word nor a list of numbers is an ``argparse`` usage error naming the flag."""
    with pytest.raises(SystemExit):
        _parse("--kv-compress", "lightkv", "--kv-compress-pool-ratios", "abc")
    error = capsys.readouterr().err
    assert (
        "argument --kv-compress-pool-ratios: --kv-compress-pool-ratios takes a comma-separated list of floats" in error
    )
    assert "got 'abc'" in error


@pytest.mark.parametrize(
    ("method", "ratios", "message"),
    [
        ("lightkv", "0", r"--kv-compress-pool-ratios must lie in \(0, 1\], got \(0.0,\)"),
        ("lightkv", "1.5", r"--kv-compress-pool-ratios must lie in \(0, 1\], got \(1.5,\)"),
        ("fastv", "0.5,0", r"--kv-compress-pool-ratios must lie in \(0, 1\]"),
        ("none", "0.5", "--kv-compress-pool-ratios need --kv-compress lightkv or fastv"),
    ],
)
def test_bad_pool_ratios_name_the_flag(method: str, ratios: str, message: str) -> None:
    """Ratios out of ``(0, 1]``, or ratios without compression, are rejected with the flag's name."""
    values = _parse("--kv-compress", method, "--kv-compress-pool-ratios", ratios)
    with pytest.raises(ValueError, match=message):
        kv_compress_settings(**values)


@pytest.mark.parametrize(
    ("value", "grouped_pools", "pool_ratios"),
    [("Off", False, None), ([0.5, 0.25], True, (0.5, 0.25)), (0.5, True, (0.5,)), (None, True, None)],
)
def test_pool_ratios_keyword(value: object, grouped_pools: bool, pool_ratios: tuple | None) -> None:
    """The ``Engine`` keyword takes the words, sequences and single numbers too."""
    settings = kv_compress_settings("lightkv", kv_compress_pool_ratios=value)
    assert (settings.grouped_pools, settings.pool_ratios) == (grouped_pools, pool_ratios)
