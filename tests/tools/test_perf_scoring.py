"""The scoring benchmark (lightkv bench scoring) on tiny shapes: its baselines compute the library's scores, and it
writes the rows the issue asks for."""

from __future__ import annotations

import json

import pytest
import torch

from lightkv_core.cli import main
from lightkv_core.kernels import cross_attention_scores
from lightkv_perf import scoring


@pytest.mark.parametrize("heads", [1, 3])
def test_baselines_compute_the_library_scores(heads):
    generator = torch.Generator().manual_seed(heads)
    q = torch.randn(heads, 50, 16, generator=generator)
    k = torch.randn(heads, 50, 16, generator=generator)
    guides = torch.tensor([3, 40, 41, 49])
    mask = torch.ones(1, 50, dtype=torch.bool)
    expected = cross_attention_scores(q[None], k[None], guides[None], torch.tensor([4]), mask, 0.25, backend="torch")[0]
    torch.testing.assert_close(scoring.eager(q, k, guides, 0.25), expected)
    torch.testing.assert_close(scoring.column_softmax(q, k, guides, 0.25), expected)
    assert float(expected.sum()) == pytest.approx(heads * 4, rel=1e-5)


def test_floor_bytes_counts_queries_guide_keys_and_output():
    assert scoring.floor_bytes(seq=10, guide_tokens=2, heads=4, kv_heads=2, head_dim=8, element=2) == (
        4 * 10 * 8 * 2 + 2 * 2 * 8 * 2 + 10 * 4
    )


def test_bench_scoring_writes_rows_ratios_and_plot(tmp_path):
    argv = ["bench", "scoring", "--quick", "--out", str(tmp_path), "--seq-lengths", "48,80", "--guide-tokens", "8"]
    assert main([*argv, "--heads", "2", "--head-dim", "16"]) == 0
    result = json.loads((tmp_path / "scoring-cpu.json").read_text())
    assert {"command", "machine", "versions"} <= set(result)
    assert {(row["S"], row["impl"]) for row in result["rows"]} == {
        (s, impl) for s in (48, 80) for impl in ("eager", "column_softmax", "torch")
    }
    for row in result["rows"]:
        assert set(row) == {"S", "H", "T", "impl", "time_s", "peak_bytes"}
        assert row["H"] == 2 and row["T"] == 8 and row["time_s"] > 0
    eager = {row["S"]: row["peak_bytes"] for row in result["rows"] if row["impl"] == "eager"}
    # eager holds the (H, S, S) float32 logits at least
    assert all(eager[s] >= 2 * s * s * 4 for s in eager)
    assert [(entry["S"], entry["time_vs_torch"]["torch"]) for entry in result["ratios"]] == [(48, 1.0), (80, 1.0)]
    assert (tmp_path / "scoring-cpu.png").stat().st_size > 0


def test_bench_scoring_rejects_guides_longer_than_the_prompt(tmp_path, capsys):
    argv = ["bench", "scoring", "--out", str(tmp_path), "--seq-lengths", "16", "--guide-tokens", "16"]
    assert main(argv) == 2
    assert "smaller than every prompt length" in capsys.readouterr().err
