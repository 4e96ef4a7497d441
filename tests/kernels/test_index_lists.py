"""Index lists may come planned on the host (checked there, copied over by the launch), all of them on the data's
device or all on the CPU; anything else is refused by name."""

from __future__ import annotations

import pytest
import torch

from lightkv_core.kernels import merge_compact, window_best_match


def test_index_lists_split_across_devices_are_refused():
    x = torch.randn(8, 4)
    rows, offsets = torch.tensor([0, 2]), torch.tensor([0, 2])
    with pytest.raises(ValueError, match="window_best_match: index lists must be all on cpu or all on the CPU"):
        window_best_match(x, rows, offsets, rows.to("meta"), offsets, backend="torch")
    with pytest.raises(ValueError, match="merge_compact: index lists must be all on"):
        merge_compact(x, torch.ones(8), rows.to("meta"), torch.zeros(3, dtype=torch.long), rows[:0], backend="torch")


def test_a_pure_gather_equals_indexing():
    x = torch.randn(6, 5)
    out_rows = torch.tensor([4, -1, 0, 5])
    out = merge_compact(x, torch.ones(6), out_rows, torch.zeros(5, dtype=torch.long), out_rows[:0], backend="torch")
    assert torch.equal(out[[0, 2, 3]], x[[4, 0, 5]])
    assert torch.equal(out[1], torch.zeros(5))
