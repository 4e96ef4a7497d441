"""The end-to-end prefill benchmark (``lightkv_perf.prefill`` and its ``prefill_*`` modules): its FLOPs formula and
one tiny run of every case."""

from __future__ import annotations

import json

import pytest

from lightkv_core.cli import main
from lightkv_perf import prefill
from lightkv_perf.common import device_tag
from lightkv_perf.prefill_cases import SIZES, TEXT_AFTER, TEXT_BEFORE, TextShape
from lightkv_perf.prefill_measure import layer_flops

pytestmark = pytest.mark.usefixtures("single_thread")


def test_layer_flops_matches_a_hand_count() -> None:
    # D = 8, H = 2 query heads, Hk = 1 KV head (d = 4), I = 16, 3 tokens (6 causal query-key pairs)
    shape = TextShape(hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=16)
    q_and_o = 2 * 8 * 8  # D x H*d, twice
    k_and_v = 2 * 8 * 4  # D x Hk*d, twice
    mlp = 3 * 8 * 16  # gate, up, down
    per_token = 2 * (q_and_o + k_and_v + mlp)  # multiply-add = 2 FLOPs
    attention = 2 * (2 * 2 * 4 * 6)  # q.k and p.v, H * d multiply-adds per pair
    assert layer_flops(3, shape) == 3 * per_token + attention == 3648
    assert layer_flops(0, shape) == 0


def test_tiny_run_records_shorter_layers_after_the_first_merge(tmp_path) -> None:
    size = SIZES["tiny"]
    schedule = prefill.schedule_for(size.text.num_layers)
    argv = ["--size", "tiny", "--quick", "--backend", "torch", "--vision-tokens", "144,288", "--out", str(tmp_path)]
    assert prefill.main(argv) == 0

    path = tmp_path / f"prefill-{device_tag()}.json"
    result = json.loads(path.read_text())
    assert path.with_suffix(".png").stat().st_size > 0
    assert result["schedule"]["merge_layers"] == list(schedule.merge_layers)
    assert [(c["model"], c["vision_tokens"]) for c in result["cases"]] == [
        ("reference", 144),
        ("reference", 288),
        ("hf", 144),
        ("hf", 288),
    ]
    first = schedule.merge_layers[0]
    for case in result["cases"]:
        prompt = case["prompt_tokens"]
        assert prompt == TEXT_BEFORE + case["vision_tokens"] + TEXT_AFTER
        stock, lightkv = case["stock"]["kv_lengths"], case["lightkv"]["kv_lengths"]
        assert stock == [prompt] * size.text.num_layers
        assert lightkv[: first + 1] == stock[: first + 1]  # the merge layer itself caches its full KV
        assert all(n < prompt for n in lightkv[first + 1 :])
        assert lightkv == sorted(lightkv, reverse=True)
        value_bytes = {"float32": 4, "bfloat16": 2}[result["dtype"]]
        per_token = 2 * size.text.num_kv_heads * size.text.head_dim * value_bytes
        assert case["lightkv"]["kv_layer_bytes"] == [n * per_token for n in lightkv]
        assert case["flops_per_layer"]["stock"] == [layer_flops(n, size.text) for n in stock]
        ratios = case["ratios"]
        assert ratios["text_flops"] < 1
        assert ratios["kv_bytes"] == pytest.approx(sum(lightkv) / sum(stock), abs=1e-3)
        assert 0 < ratios["vision_retention"] < 1
        assert len(case["stock"]["prefill_s"]) == len(case["lightkv"]["reduce_s"]) == 1
        assert 0 < case["lightkv"]["reduce_s_median"] < case["lightkv"]["prefill_s_median"]
    # both adapters make the same cut from the same schedule
    assert result["cases"][0]["lightkv"]["kv_lengths"] == result["cases"][2]["lightkv"]["kv_lengths"]


@pytest.mark.parametrize(
    "options, message",
    [
        (
            ["--vision-tokens", "5x"],
            "--vision-tokens: comma-separated positive multiples of 144 for this size, got '5x'",
        ),
        (["--vision-tokens", "100"], "--vision-tokens: comma-separated positive multiples of 144"),
        (["--models", "foo"], "--models: choose from reference, hf, got 'foo'"),
    ],
)
def test_bad_options_are_one_usage_line(options, message, capsys) -> None:
    assert main(["bench", "prefill", "--size", "tiny", *options]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("lightkv: error: ") and message in error and "\n" not in error
