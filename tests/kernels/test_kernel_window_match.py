"""Property tests of the window matching kernel (README, "Kernels") against the float64 oracle, both backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.kernel_inputs import ALL_DTYPES
from helpers.oracle import oracle_window_best_match
from hypothesis import given, settings
from hypothesis import strategies as st

from lightkv_core.kernels import window_match as match_mod
from lightkv_core.kernels.window_match import window_best_match

SIM_TOL = 1e-5  # float32 cosine vs float64
MARGIN = 2e-5  # a B token within this of the best (in float64) makes the argmax ambiguous in float32


def layout_rows(x: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as ``x`` (N, D), laid out contiguously, as a slice of a wider tensor, or column-major."""
    n, d = x.shape
    if layout == "wide":
        wide = torch.full((n, d + 7), 123.0, dtype=x.dtype)
        wide[:, 3 : 3 + d] = x
        return wide[:, 3 : 3 + d]
    if layout == "transposed":
        return x.T.contiguous().T
    return x.clone()


WINDOW_SIZE = st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(4, 20), st.integers(33, 70))


@st.composite
def match_cases(draw, dtypes):
    n_windows = draw(st.integers(0, 6))
    return dict(
        windows=draw(st.lists(st.tuples(WINDOW_SIZE, WINDOW_SIZE), min_size=n_windows, max_size=n_windows)),
        dim=draw(st.sampled_from([1, 2, 5, 8, 16, 24, 33, 48, 136])),
        extra_rows=draw(st.integers(0, 8)),
        dtype=draw(st.sampled_from(dtypes)),
        layout=draw(st.sampled_from(["contiguous", "wide", "transposed"])),
        dup_frac=draw(st.sampled_from([0.0, 0.3, 0.8])),
        a_copy_frac=draw(st.sampled_from([0.0, 0.5, 1.0])),
        zero_frac=draw(st.sampled_from([0.0, 0.0, 0.2])),
        row_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        offset_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def build(case: dict, device: str):
    gen = torch.Generator().manual_seed(case["seed"])
    sizes = case["windows"]
    total = sum(na + nb for na, nb in sizes)
    n = total + case["extra_rows"]
    perm = torch.randperm(n, generator=gen)
    x = torch.randn(n, case["dim"], generator=gen)
    a_rows, b_rows, a_off, b_off = [], [], [0], [0]
    used = 0
    for na, nb in sizes:
        a = perm[used : used + na]
        b = perm[used + na : used + na + nb]
        used += na + nb
        if nb:
            # Duplicated B vectors: identical rows tie exactly, the lowest position must win.
            n_dup = int(case["dup_frac"] * nb)
            src = b[torch.randint(0, nb, (n_dup,), generator=gen)]
            dst = b[torch.randint(0, nb, (n_dup,), generator=gen)]
            x[dst] = x[src]
            # A tokens equal to a B token of their window: their best is (one of the copies of) that token.
            n_copy = int(case["a_copy_frac"] * na)
            if n_copy:
                x[a[:n_copy]] = x[b[torch.randint(0, nb, (n_copy,), generator=gen)]]
        a_rows.append(a)
        b_rows.append(b)
        a_off.append(a_off[-1] + na)
        b_off.append(b_off[-1] + nb)
    if case["zero_frac"] and n:
        x[torch.rand(n, generator=gen) < case["zero_frac"]] = 0.0
    x = layout_rows(x.to(case["dtype"]), case["layout"])
    cat = lambda parts: torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)  # noqa: E731
    return (
        x.to(device),
        cat(a_rows).to(case["row_dtype"]).to(device),
        torch.tensor(a_off, dtype=case["offset_dtype"], device=device),
        cat(b_rows).to(case["row_dtype"]).to(device),
        torch.tensor(b_off, dtype=case["offset_dtype"], device=device),
    )


def cosines(xa: np.ndarray, xb: np.ndarray) -> np.ndarray:
    na = np.sqrt((xa * xa).sum(1))
    nb = np.sqrt((xb * xb).sum(1))
    return (xa @ xb.T) / (na[:, None] * nb[None, :] + 1e-8)


def check_match(x, a_rows, a_offsets, b_rows, b_offsets, backend: str) -> int:
    """Compare with the oracle; returns how many A tokens had their ``best`` checked exactly."""
    best, sim = window_best_match(x, a_rows, a_offsets, b_rows, b_offsets, backend=backend)
    num_a = a_rows.numel()
    assert best.dtype == torch.int64 and sim.dtype == torch.float32
    assert best.shape == (num_a,) and sim.shape == (num_a,)
    assert best.device == x.device and sim.device == x.device

    xn = x.detach().cpu().to(torch.float64).numpy()
    an, bn = a_rows.cpu().numpy().astype(np.int64), b_rows.cpu().numpy().astype(np.int64)
    a_off, b_off = a_offsets.cpu().numpy().astype(np.int64), b_offsets.cpu().numpy().astype(np.int64)
    a_window = np.repeat(np.arange(len(a_off) - 1), np.diff(a_off))
    ref_best, ref_sim = oracle_window_best_match(xn, an, a_window, bn, b_off)
    got_best, got_sim = best.cpu().numpy(), sim.cpu().numpy().astype(np.float64)
    raw = x.detach().cpu()

    exact = 0
    for w in range(len(a_off) - 1):
        a0, a1, b0, b1 = a_off[w], a_off[w + 1], b_off[w], b_off[w + 1]
        if a0 == a1:
            continue
        if b0 == b1:
            assert np.all(got_best[a0:a1] == -1), f"window {w} has no B token"
            assert np.all(np.isneginf(got_sim[a0:a1])), f"window {w} has no B token"
            continue
        assert np.all((got_best[a0:a1] >= b0) & (got_best[a0:a1] < b1)), f"best outside window {w}"
        cos = cosines(xn[an[a0:a1]], xn[bn[b0:b1]])  # (na, nb) float64
        chosen = cos[np.arange(a1 - a0), got_best[a0:a1] - b0]
        np.testing.assert_allclose(got_sim[a0:a1], ref_sim[a0:a1], rtol=0, atol=SIM_TOL)
        np.testing.assert_allclose(chosen, ref_sim[a0:a1], rtol=0, atol=SIM_TOL)  # a best B, up to rounding
        np.testing.assert_allclose(got_sim[a0:a1], chosen, rtol=0, atol=SIM_TOL)  # sim is the chosen B's
        for i in range(a1 - a0):
            a = a0 + i
            if not raw[an[a]].any():
                # A zero vector has cosine exactly 0 with every B token: a tie, the first position wins.
                assert got_best[a] == b0, f"A token {a} (zero vector): best {got_best[a]}, expected {b0}"
                exact += 1
                continue
            near = np.nonzero(cos[i] >= ref_sim[a] - MARGIN)[0] + b0
            winner = raw[bn[ref_best[a]]]
            if all(torch.equal(raw[bn[j]], winner) for j in near):
                # Unambiguous up to exact copies of one vector: the lowest position must win.
                assert got_best[a] == ref_best[a], (
                    f"A token {a} (window {w}): best {got_best[a]}, expected {ref_best[a]}; "
                    f"B positions {near.tolist()} hold identical vectors"
                )
                exact += 1
    return exact


@settings(max_examples=40)
@given(data=st.data())
def test_window_match_matches_oracle(backend, device, data):
    case = data.draw(match_cases(ALL_DTYPES))
    check_match(*build(case, device), backend)


@settings(max_examples=10)
@given(data=st.data())
def test_window_match_duplicates_across_b_tiles(backend, device, data):
    """One big window (more than one 32-token tile of A and of B) full of copies."""
    case = data.draw(match_cases(ALL_DTYPES))
    case.update(
        windows=[(data.draw(st.integers(33, 70)), data.draw(st.integers(33, 70))), (3, 0), (0, 5)],
        dim=data.draw(st.sampled_from([8, 16, 33, 48, 64, 136])),
        dup_frac=0.8,
        a_copy_frac=1.0,
    )
    exact = check_match(*build(case, device), backend)
    assert exact > 0  # the construction must exercise the tie rule


@pytest.mark.parametrize("dim", [16, 64, 100, 128])
@pytest.mark.parametrize("num_b", [2, 3, 6, 40])
def test_identical_b_rows_tie_to_lowest_position(backend, device, dim, num_b):
    """Every B token is the same vector as the A token: all cosines tie, position 0 must win."""
    v = torch.randn(dim, generator=torch.Generator().manual_seed(dim * 100 + num_b))
    x = v.repeat(1 + num_b, 1).to(device)
    best, sim = window_best_match(
        x,
        torch.tensor([0], device=device),
        torch.tensor([0, 1], device=device),
        torch.arange(1, 1 + num_b, device=device),
        torch.tensor([0, num_b], device=device),
        backend=backend,
    )
    assert best.tolist() == [0], f"identical B rows: got position {best.item()}, the tie rule says 0"
    assert sim.item() == pytest.approx(1.0, abs=SIM_TOL)


def test_zero_a_vector_ties_to_first_b_of_window(backend, device):
    """Cosine with a zero vector is exactly 0 for every B token: the first B of each window wins,
    also when the window starts mid-array and spans several B tiles."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(120, 8, generator=gen)
    x[0] = 0.0
    x[1] = 0.0
    a_rows = torch.tensor([0, 1])
    b_rows = torch.arange(2, 120)
    best, sim = window_best_match(
        x.to(device),
        a_rows.to(device),
        torch.tensor([0, 1, 2], device=device),
        b_rows.to(device),
        torch.tensor([0, 7, 118], device=device),
        backend=backend,
    )
    assert best.tolist() == [0, 7]
    assert sim.tolist() == [0.0, 0.0]


def test_window_match_no_windows(backend, device):
    x = torch.randn(4, 8, device=device)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    zero = torch.zeros(1, dtype=torch.long, device=device)
    best, sim = window_best_match(x, empty, zero, empty, zero, backend=backend)
    assert best.shape == (0,) and sim.shape == (0,)
    assert best.dtype == torch.int64 and sim.dtype == torch.float32


# ------------------------------------------------------------------------------------------------------
# Launch-wrapper checks
# ------------------------------------------------------------------------------------------------------


def valid_args(device="cpu"):
    return dict(
        x=torch.randn(10, 8, generator=torch.Generator().manual_seed(0)).to(device),
        a_rows=torch.tensor([0, 2, 4, 6], device=device),
        a_offsets=torch.tensor([0, 2, 4], device=device),
        b_rows=torch.tensor([1, 3, 5], device=device),
        b_offsets=torch.tensor([0, 1, 3], device=device),
    )


BAD_INPUTS = {
    "x_ndim": (lambda a: a.update(x=a["x"][None]), ValueError, r"\(N, D\)"),
    "x_1d": (lambda a: a.update(x=a["x"][0]), ValueError, r"\(N, D\)"),
    "x_int": (lambda a: a.update(x=a["x"].to(torch.int64)), TypeError, "float16"),
    "x_float64": (lambda a: a.update(x=a["x"].double()), TypeError, "float16"),
    "a_rows_float": (lambda a: a.update(a_rows=a["a_rows"].float()), TypeError, "int32/int64"),
    "b_offsets_bool": (lambda a: a.update(b_offsets=a["b_offsets"].bool()), TypeError, "int32/int64"),
    "a_rows_2d": (lambda a: a.update(a_rows=a["a_rows"][None]), ValueError, "dimension"),
    "window_count_mismatch": (lambda a: a.update(b_offsets=torch.tensor([0, 1, 2, 3])), ValueError, "windows"),
    "empty_offsets": (
        lambda a: a.update(a_offsets=torch.zeros(0, dtype=torch.long), b_offsets=torch.zeros(0, dtype=torch.long)),
        ValueError,
        "windows",
    ),
    "offsets_not_from_zero": (lambda a: a.update(a_offsets=torch.tensor([1, 2, 4])), ValueError, "rise"),
    "offsets_wrong_end": (lambda a: a.update(b_offsets=torch.tensor([0, 1, 2])), ValueError, "rise"),
    "offsets_non_monotone": (
        lambda a: a.update(
            a_offsets=torch.tensor([0, 3, 1, 4]),
            b_offsets=torch.tensor([0, 1, 1, 3]),
        ),
        ValueError,
        "rise",
    ),
    "a_rows_out_of_range": (lambda a: a.update(a_rows=torch.tensor([0, 2, 4, 10])), ValueError, "out of range"),
    "b_rows_negative": (lambda a: a.update(b_rows=torch.tensor([1, -3, 5])), ValueError, "out of range"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_window_match_rejects_bad_input(name, backend):
    mutate, exc, match = BAD_INPUTS[name]
    args = valid_args()
    mutate(args)
    with pytest.raises(exc, match=match):
        window_best_match(**args, backend=backend)


def test_window_match_bad_backend_name():
    with pytest.raises(ValueError, match="backend"):
        window_best_match(**valid_args(), backend="Triton")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = valid_args("cpu")
    with pytest.raises(RuntimeError, match="Triton backend cannot run"):
        window_best_match(**args, backend="triton")

    def no_triton(*_a, **_k):
        raise AssertionError("auto must not pick Triton for CPU tensors without the interpreter")

    monkeypatch.setattr(match_mod, "window_best_match_triton", no_triton)
    got = window_best_match(**args, backend="auto")
    want = window_best_match(**args, backend="torch")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def copies_across_tile_boundaries(dtype: torch.dtype):
    """Two windows with the same 70 B vectors (the second starting mid-array) and 40 A tokens each.

    Each A token is a noisy copy of one of three targets; each target sits at several B positions on both
    sides of the 16/32/64-token tile boundaries, so its lowest copy is the unique right answer.
    Returns the inputs and the expected ``best`` (positions in ``b_rows``).
    """
    gen = torch.Generator().manual_seed(7)
    dim, num_a, num_b = 48, 40, 70
    copies = {15: 0, 16: 0, 17: 0, 31: 1, 32: 1, 47: 1, 63: 2, 64: 2, 65: 2}
    targets = torch.randn(3, dim, generator=gen)
    b_vectors = torch.randn(num_b, dim, generator=gen)
    for position, target in copies.items():
        b_vectors[position] = targets[target]
    a_target = torch.arange(num_a) % 3
    a_target[20:] = a_target[:20]
    a_vectors = targets[a_target] + 0.05 * torch.randn(num_a, dim, generator=gen)
    a_vectors[20:] = a_vectors[:20]  # identical A rows in another A tile of the same window
    first_copy = {target: min(p for p, t in copies.items() if t == target) for target in range(3)}
    rows = []
    for _ in range(2):
        rows += [a_vectors, b_vectors]
    x = torch.cat([torch.randn(5, dim, generator=gen), *rows]).to(dtype)
    window_rows = num_a + num_b
    a_rows = torch.cat([torch.arange(num_a) + 5 + w * window_rows for w in range(2)])
    b_rows = torch.cat([torch.arange(num_b) + 5 + num_a + w * window_rows for w in range(2)])
    # The second window's B tokens begin at position 70 of b_rows: its tiles fall elsewhere in the array.
    expected = torch.tensor([first_copy[int(t)] for t in a_target])
    expected = torch.cat([expected, expected + num_b])
    offsets = torch.tensor([0, num_a, 2 * num_a])
    return (x, a_rows, offsets, b_rows, torch.tensor([0, num_b, 2 * num_b])), expected


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("tiles", [(16, 16, 8), (16, 32, 16), (32, 64, 32), (16, 16, 64)], ids=str)
def test_copies_on_both_sides_of_a_tile_boundary_tie_to_the_lowest(backend, device, dtype, tiles):
    """The tie rule may not depend on where a tile boundary falls: every launch config of the Triton kernel
    and every A-chunking of the fallback give the lowest copy, the same best for identical A rows (in another
    tile or window), and for both windows the same answer relative to the window."""
    inputs, expected = copies_across_tile_boundaries(dtype)
    inputs = tuple(t.to(device) for t in inputs)
    block_a, block_b, block_d = tiles
    if backend == "triton":
        config = {"BLOCK_A": block_a, "BLOCK_B": block_b, "BLOCK_D": block_d, "num_warps": 4, "num_stages": 1}
        best, sim = match_mod.window_best_match_triton(*inputs, config=config)
    else:
        best, sim = match_mod.window_best_match_torch(*inputs, max_chunk_elements=block_a * 70)
    assert best.cpu().tolist() == expected.tolist()
    sim = sim.cpu()
    # the kernel's similarity is a function of the two vectors; the fallback's float64 matmul, rounded to float32,
    # may still differ by one float32 ulp (at most 2**-24 below 1) between copies of an A row at other positions
    tolerance = 0.0 if backend == "triton" else 2.0**-24
    torch.testing.assert_close(sim[:20], sim[20:40], rtol=0, atol=tolerance)
    torch.testing.assert_close(sim[:40], sim[40:], rtol=0, atol=tolerance)
