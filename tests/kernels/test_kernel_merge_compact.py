"""Property tests of the merge + compaction kernel (README, "Kernels") against the float64 oracle, both backends."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from helpers.oracle import oracle_merge_compact
from hypothesis import given, settings
from hypothesis import strategies as st

from lightkv_core.kernels import launch
from lightkv_core.kernels.merge_compact import merge_compact

# ``lightkv_core.kernels.merge_compact`` as an attribute is the function (re-exported), not the module.
merge_mod = importlib.import_module("lightkv_core.kernels.merge_compact")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (rtol, atol) for merged rows: float32 accumulation, then one rounding to the output dtype.
TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

SOURCE_COUNT = st.one_of(st.sampled_from([0, 0, 1, 2]), st.integers(3, 7))


@st.composite
def merge_cases(draw):
    n_out = draw(st.integers(0, 40))
    return dict(
        rows=draw(st.integers(1, 60)),
        dim=draw(st.sampled_from([1, 3, 8, 17, 32, 48])),
        slots=draw(
            st.lists(
                st.tuples(st.sampled_from(["real", "real", "real", "pad"]), SOURCE_COUNT),
                min_size=n_out,
                max_size=n_out,
            )
        ),
        weights=draw(st.sampled_from(["uniform", "with_zeros", "tiny", "all_zero", "mixed_scale"])),
        dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(["contiguous", "wide", "transposed"])),
        index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        specials=draw(st.booleans()),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def make_weights(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, generator=gen)
    if kind == "with_zeros":
        return torch.where(torch.rand(n, generator=gen) < 0.4, 0.0, u * 3)
    if kind == "tiny":  # totals below the 1e-8 clamp
        return u * 2e-9
    if kind == "all_zero":
        return torch.zeros(n)
    if kind == "mixed_scale":  # zeros, tiny and ordinary weights side by side
        pick = torch.randint(0, 3, (n,), generator=gen)
        return torch.where(pick == 0, 0.0, torch.where(pick == 1, u * 1e-9, u * 10))
    return u + 0.01


def build(case: dict, device: str):
    gen = torch.Generator().manual_seed(case["seed"])
    n, d = case["rows"], case["dim"]
    x = torch.randn(n, d, generator=gen) * 2
    if case["specials"]:
        x[torch.rand(n, d, generator=gen) < 0.1] = -0.0
        x[torch.rand(n, d, generator=gen) < 0.05] = 3e-6  # subnormal in float16
    x = x.to(case["dtype"])
    if case["layout"] == "wide":
        x = torch.cat([x, torch.full((n, 5), 77.0, dtype=x.dtype)], dim=1)[:, :d]
    elif case["layout"] == "transposed":
        x = x.T.contiguous().T
    weights = make_weights(case["weights"], n, gen)
    out_rows, src_offsets, src_rows = [], [0], []
    for kind, n_src in case["slots"]:
        if kind == "pad":
            out_rows.append(-1)
            n_src = 0
        else:
            out_rows.append(int(torch.randint(0, n, (1,), generator=gen)))
        src_rows.extend(torch.randint(0, n, (n_src,), generator=gen).tolist())
        src_offsets.append(len(src_rows))
    idx = dict(dtype=case["index_dtype"], device=device)
    return (
        x.to(device),
        weights.to(device),
        torch.tensor(out_rows, **idx),
        torch.tensor(src_offsets, **idx),
        torch.tensor(src_rows, **idx),
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(BITS[t.dtype])


def check_merge(x, weights, out_rows, src_offsets, src_rows, backend: str) -> None:
    out = merge_compact(x, weights, out_rows, src_offsets, src_rows, backend=backend)
    assert out.dtype == x.dtype
    assert out.shape == (out_rows.numel(), x.shape[1])
    assert out.device == x.device

    rows = out_rows.cpu().long()
    offsets = src_offsets.cpu().long()
    has_src = offsets[1:] > offsets[:-1]
    pad = rows < 0
    copy = ~pad & ~has_src
    # Padding rows are +0.0, bit for bit.
    assert torch.all(bits(out)[pad] == 0), "padding rows must be zeros"
    # Rows without sources are copies, bit for bit.
    assert torch.equal(bits(out)[copy], bits(x)[rows[copy]]), "rows without sources must be copied exactly"

    ref = oracle_merge_compact(
        x.detach().cpu().to(torch.float64).numpy(),
        weights.cpu().to(torch.float64).numpy(),
        rows.numpy(),
        offsets.numpy(),
        src_rows.cpu().long().numpy(),
    )
    got = out.detach().cpu().to(torch.float64).numpy()
    rtol, atol = TOLERANCE[x.dtype]
    merged = has_src.numpy()
    np.testing.assert_allclose(got[merged], ref[merged], rtol=rtol, atol=atol)


@settings(max_examples=40)
@given(case=merge_cases())
def test_merge_compact_matches_oracle(backend, device, case):
    check_merge(*build(case, device), backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_compact_hand_checked(backend, device, dtype):
    """A small case worked out by hand: weighted averages, the 1e-8 clamp, copies and padding."""
    x = torch.tensor(
        [[1.0, 2.0], [3.0, -4.0], [5.0, 6.0], [-7.0, 8.0], [0.5, 0.25], [2.0, 2.0]], dtype=dtype, device=device
    )
    w = torch.tensor([1.0, 3.0, 0.0, 0.0, 2e-9, 2e-9], device=device)
    out_rows = torch.tensor([0, -1, 2, 4, 3], device=device)
    src_offsets = torch.tensor([0, 1, 1, 2, 3, 3], device=device)
    src_rows = torch.tensor([1, 3, 5], device=device)
    out = merge_compact(x, w, out_rows, src_offsets, src_rows, backend=backend).float().cpu()
    want = torch.tensor(
        [
            [(1 + 9) / 4, (2 - 12) / 4],  # rows 0 (w 1) and 1 (w 3)
            [0.0, 0.0],  # padding
            [0.0, 0.0],  # rows 2 and 3 both weigh 0: 0 / max(0, 1e-8)
            [(0.5 * 2e-9 + 2 * 2e-9) / 1e-8, (0.25 * 2e-9 + 2 * 2e-9) / 1e-8],  # total 4e-9 < 1e-8: clamped
            [-7.0, 8.0],  # no sources: a copy, whatever its weight
        ]
    )
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out, want, rtol=rtol, atol=atol)


def test_merge_compact_wide_rows(backend, device):
    """More features than one Triton block (1024)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 1100, generator=gen).to(device)
    w = torch.rand(6, generator=gen).to(device)
    args = (x, w, torch.tensor([5, 0, -1], device=device), torch.tensor([0, 2, 2, 2], device=device))
    check_merge(*args, torch.tensor([1, 3], device=device), backend)


def test_merge_compact_no_output_rows(backend, device):
    x = torch.randn(3, 4, device=device)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    out = merge_compact(
        x, torch.ones(3, device=device), empty, torch.zeros(1, dtype=torch.long, device=device), empty, backend=backend
    )
    assert out.shape == (0, 4) and out.dtype == x.dtype


def test_merge_compact_noncontiguous_weights(backend, device):
    """``weights`` is any (N,) float32 tensor, e.g. a column of a (N, 2) tensor."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(8, 16, generator=gen).to(device)
    w_wide = torch.rand(8, 2, generator=gen).to(device)
    w = w_wide[:, 1]
    assert not w.is_contiguous()
    args = (torch.tensor([1, 4, 6], device=device), torch.tensor([0, 2, 3, 3], device=device))
    src = torch.tensor([0, 2, 5], device=device)
    got = merge_compact(x, w, *args, src, backend=backend)
    want = merge_compact(x, w.contiguous(), *args, src, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_merge_compact_empty_input_padding_only(backend, device):
    """A sample with no rows at all still yields its padding rows."""
    x = torch.zeros(0, 4, device=device)
    out = merge_compact(
        x,
        torch.zeros(0, device=device),
        torch.tensor([-1, -1], device=device),
        torch.zeros(3, dtype=torch.long, device=device),
        torch.zeros(0, dtype=torch.long, device=device),
        backend=backend,
    )
    assert out.shape == (2, 4) and bool((out == 0).all())


# ------------------------------------------------------------------------------------------------------
# Launch-wrapper checks
# ------------------------------------------------------------------------------------------------------


def valid_args(device="cpu"):
    return dict(
        x=torch.randn(6, 4, generator=torch.Generator().manual_seed(0)).to(device),
        weights=torch.rand(6, device=device),
        out_rows=torch.tensor([0, 2, -1], device=device),
        src_offsets=torch.tensor([0, 2, 2, 2], device=device),
        src_rows=torch.tensor([1, 3], device=device),
    )


BAD_INPUTS = {
    "x_ndim": (lambda a: a.update(x=a["x"][None]), ValueError, r"\(N, D\)"),
    "x_1d": (lambda a: a.update(x=a["x"][:, 0]), ValueError, r"\(N, D\)"),
    "x_int": (lambda a: a.update(x=a["x"].to(torch.int32)), TypeError, "float16"),
    "x_not_tensor": (lambda a: a.update(x=a["x"].tolist()), TypeError, "torch.Tensor"),
    "weights_half": (lambda a: a.update(weights=a["weights"].half()), TypeError, "weights"),
    "weights_float64": (lambda a: a.update(weights=a["weights"].double()), TypeError, "weights"),
    "weights_shape": (lambda a: a.update(weights=a["weights"][:5]), (TypeError, ValueError), "weights"),
    "out_rows_float": (lambda a: a.update(out_rows=a["out_rows"].float()), TypeError, "int32/int64"),
    "src_rows_2d": (lambda a: a.update(src_rows=a["src_rows"][None]), ValueError, "dimension"),
    "offsets_length": (lambda a: a.update(src_offsets=torch.tensor([0, 2, 2])), ValueError, "src_offsets"),
    "offsets_not_from_zero": (lambda a: a.update(src_offsets=torch.tensor([1, 2, 2, 2])), ValueError, "rise"),
    "offsets_wrong_end": (lambda a: a.update(src_offsets=torch.tensor([0, 1, 1, 1])), ValueError, "rise"),
    "offsets_decreasing": (lambda a: a.update(src_offsets=torch.tensor([0, 2, 1, 2])), ValueError, "rise"),
    "out_rows_below_minus_one": (lambda a: a.update(out_rows=torch.tensor([0, -2, -1])), ValueError, "out_rows"),
    "out_rows_too_big": (lambda a: a.update(out_rows=torch.tensor([0, 6, -1])), ValueError, "out_rows"),
    "src_rows_too_big": (lambda a: a.update(src_rows=torch.tensor([1, 6])), ValueError, "src_rows"),
    "src_rows_negative": (lambda a: a.update(src_rows=torch.tensor([-1, 3])), ValueError, "src_rows"),
    "padding_with_sources": (lambda a: a.update(out_rows=torch.tensor([-1, 2, -1])), ValueError, "padding"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_merge_compact_rejects_bad_input(name, backend):
    mutate, exc, match = BAD_INPUTS[name]
    args = valid_args()
    mutate(args)
    with pytest.raises(exc, match=match):
        merge_compact(**args, backend=backend)


def test_merge_compact_bad_backend_name():
    with pytest.raises(ValueError, match="backend"):
        merge_compact(**valid_args(), backend="numpy")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = valid_args("cpu")
    with pytest.raises(RuntimeError, match="Triton backend cannot run"):
        merge_compact(**args, backend="triton")
    if launch.TRITON_AVAILABLE:
        # Under "auto" the Triton kernel must not be launched: make any launch fail loudly.
        class NoLaunch:
            def __getitem__(self, grid):
                raise AssertionError("auto must not pick Triton for CPU tensors without the interpreter")

        monkeypatch.setattr(merge_mod, "merge_compact_kernel", NoLaunch())
    assert torch.equal(merge_compact(**args, backend="auto"), merge_compact(**args, backend="torch"))
