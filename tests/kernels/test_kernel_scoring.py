"""Property tests of the scoring kernel (README, "Kernels") against the float64 oracle, for both backends."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from helpers.kernel_inputs import ALL_DTYPES, make_heads, to_np
from helpers.oracle import oracle_cross_attention_scores
from hypothesis import given, settings
from hypothesis import strategies as st

from lightkv_core.kernels import launch
from lightkv_core.kernels import scoring as scoring_mod
from lightkv_core.kernels.scoring import cross_attention_scores

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@st.composite
def scoring_cases(draw, dtypes):
    batch = draw(st.integers(1, 3))
    heads = draw(st.sampled_from([1, 2, 3, 4, 6, 8]))
    kv_heads = draw(st.sampled_from([h for h in range(1, heads + 1) if heads % h == 0]))
    return dict(
        batch=batch,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([8, 16, 24, 32, 40])),
        seq=draw(st.integers(1, 80)),
        width=draw(st.integers(0, 40)),
        count_fracs=draw(st.lists(st.sampled_from([0.0, 0.3, 1.0, None]), min_size=batch, max_size=batch)),
        pads=draw(
            st.lists(
                st.tuples(st.sampled_from(["full", "left", "right", "random", "empty"]), st.floats(0.0, 0.9)),
                min_size=batch,
                max_size=batch,
            )
        ),
        dtype=draw(st.sampled_from(dtypes)),
        q_layout=draw(st.sampled_from(["contiguous", "bshd", "wide"])),
        k_layout=draw(st.sampled_from(["contiguous", "bshd", "wide"])),
        mag=draw(st.sampled_from([0.3, 1.0, 2.5])),
        scale=draw(st.one_of(st.none(), st.floats(0.02, 0.6))),
        index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        pad_value=draw(st.sampled_from([-1, 10_000, 0])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def build(case: dict, device: str):
    gen = torch.Generator().manual_seed(case["seed"])
    b, h, hk, d, s, t = (case[n] for n in ("batch", "heads", "kv_heads", "head_dim", "seq", "width"))
    q = make_heads(gen, (b, h, s, d), case["q_layout"], case["dtype"], case["mag"], device)
    k = make_heads(gen, (b, hk, s, d), case["k_layout"], case["dtype"], case["mag"], device)
    mask = torch.ones(b, s, dtype=torch.bool)
    for i, (kind, frac) in enumerate(case["pads"]):
        n_pad = int(frac * s)
        if kind == "left":
            mask[i, :n_pad] = False
        elif kind == "right":
            mask[i, s - n_pad :] = False
        elif kind == "random":
            mask[i] = torch.rand(s, generator=gen) >= frac
        elif kind == "empty":
            mask[i] = False
    counts = []
    for frac in case["count_fracs"]:
        if frac is None:  # any count
            counts.append(int(torch.randint(0, t + 1, (1,), generator=gen)))
        else:
            counts.append(round(frac * t))
    guide = torch.full((b, t), case["pad_value"], dtype=torch.int64)
    for i, c in enumerate(counts):
        if c:
            guide[i, :c] = torch.randint(0, s, (c,), generator=gen)  # may repeat, may hit padding positions
    return (
        q,
        k,
        guide.to(case["index_dtype"]).to(device),
        torch.tensor(counts, dtype=case["index_dtype"]).to(device),
        mask.to(device),
    )


def max_abs_logit(q: np.ndarray, k: np.ndarray, guide: np.ndarray, counts: np.ndarray, scale: float) -> float:
    group = q.shape[1] // k.shape[1]
    worst = 0.0
    for b, c in enumerate(counts):
        if c:
            keys = np.repeat(k[b][:, guide[b, :c]], group, axis=0)  # (H, c, d)
            worst = max(worst, float(np.abs(scale * q[b] @ keys.transpose(0, 2, 1)).max()))
    return worst


def check_scores(case: dict, backend: str, device: str) -> None:
    q, k, guide, counts, mask = build(case, device)
    out = cross_attention_scores(q, k, guide, counts, mask, case["scale"], backend=backend)
    assert out.dtype == torch.float32
    assert out.shape == mask.shape
    assert out.device == q.device

    scale = 1.0 / math.sqrt(case["head_dim"]) if case["scale"] is None else case["scale"]
    qn, kn, gn, cn, mn = to_np(q), to_np(k), to_np(guide), to_np(counts), to_np(mask)
    ref = oracle_cross_attention_scores(qn, kn, gn, cn, mn, scale)
    got = to_np(out)

    # Padding rows and samples without guides are exactly 0.
    assert np.all(got[~mn] == 0.0)
    assert np.all(got[cn == 0] == 0.0)
    # float32 logits: the relative error of each probability grows with the logit size.
    tol = 2e-6 * (1.0 + max_abs_logit(qn, kn, gn, cn, scale))
    np.testing.assert_allclose(got, ref, rtol=tol, atol=1e-8 * max(1.0, float(np.abs(ref).max())))
    # Every column of probabilities sums to 1 over the real queries.
    for b in range(case["batch"]):
        if cn[b] and mn[b].any():
            assert got[b].sum() == pytest.approx(case["heads"] * cn[b], rel=1e-5)


@settings(max_examples=40)
@given(data=st.data())
def test_scores_match_oracle(backend, device, data):
    case = data.draw(scoring_cases(ALL_DTYPES))
    check_scores(case, backend, device)


@settings(max_examples=30)
@given(data=st.data(), rows_per_chunk=st.integers(1, 7))
def test_fallback_query_chunks_match_oracle(data, rows_per_chunk):
    """The fallback's two-pass path (logits larger than its chunk budget), with padding rows inside chunks."""
    case = data.draw(scoring_cases(ALL_DTYPES))
    q, k, guide, counts, mask = build(case, "cpu")
    scale = 1.0 / math.sqrt(case["head_dim"]) if case["scale"] is None else case["scale"]
    budget = case["heads"] * max(1, case["width"]) * rows_per_chunk
    got = to_np(scoring_mod.cross_attention_scores_torch(q, k, guide, counts, mask, scale, max_chunk_elements=budget))
    qn, kn, gn, cn, mn = to_np(q), to_np(k), to_np(guide), to_np(counts), to_np(mask)
    ref = oracle_cross_attention_scores(qn, kn, gn, cn, mn, scale)
    assert np.all(got[~mn] == 0.0)
    tol = 2e-6 * (1.0 + max_abs_logit(qn, kn, gn, cn, scale))
    np.testing.assert_allclose(got, ref, rtol=tol, atol=1e-8 * max(1.0, float(np.abs(ref).max())))


@settings(max_examples=10)
@given(data=st.data())
def test_scores_gqa_extremes_and_padding(backend, device, data):
    """Hk == 1 and Hk == H with a left-padded and a right-padded sample and a sample without guides."""
    case = data.draw(scoring_cases(ALL_DTYPES))
    case.update(
        batch=3,
        kv_heads=data.draw(st.sampled_from([1, case["heads"]])),
        count_fracs=[1.0, 0.0, 0.3],
        pads=[("left", 0.4), ("right", 0.4), ("full", 0.0)],
        width=max(case["width"], 4),
        seq=max(case["seq"], 5),
    )
    check_scores(case, backend, device)


def test_scores_left_padding_invariance(backend, device):
    """The same sample left-padded by different amounts scores the same on its real tokens."""
    gen = torch.Generator().manual_seed(7)
    h, hk, s, d, pad = 4, 2, 30, 16, 11
    q1 = torch.randn(1, h, s, d, generator=gen)
    k1 = torch.randn(1, hk, s, d, generator=gen)
    g1 = torch.tensor([[3, 17, 29, 5]])
    q = torch.cat([torch.cat([torch.randn(1, h, pad, d, generator=gen), q1], 2), torch.cat([q1, q1[:, :, :pad]], 2)])
    k = torch.cat([torch.cat([torch.randn(1, hk, pad, d, generator=gen), k1], 2), torch.cat([k1, k1[:, :, :pad]], 2)])
    guide = torch.cat([g1 + pad, g1])
    mask = torch.ones(2, s + pad, dtype=torch.bool)
    mask[0, :pad] = False
    mask[1, s:] = False
    to = dict(device=device)
    out = cross_attention_scores(
        q.to(**to), k.to(**to), guide.to(**to), torch.tensor([4, 4], **to), mask.to(**to), backend=backend
    ).cpu()
    torch.testing.assert_close(out[0, pad:], out[1, :s], rtol=1e-5, atol=1e-7)
    assert out[0, :pad].eq(0).all() and out[1, s:].eq(0).all()
    assert out[0, pad:].min() > 0


# ------------------------------------------------------------------------------------------------------
# Launch-wrapper checks
# ------------------------------------------------------------------------------------------------------


def valid_args(device="cpu"):
    gen = torch.Generator().manual_seed(0)
    return dict(
        q=torch.randn(2, 4, 10, 8, generator=gen).to(device),
        k=torch.randn(2, 2, 10, 8, generator=gen).to(device),
        guide_index=torch.tensor([[1, 2, 3], [4, 0, 0]], device=device),
        guide_count=torch.tensor([3, 1], device=device),
        query_mask=torch.ones(2, 10, dtype=torch.bool, device=device),
    )


BAD_INPUTS = {
    "q_ndim": (lambda a: a.update(q=a["q"][0]), ValueError, "q must be"),
    "k_ndim": (lambda a: a.update(k=a["k"][:, 0]), ValueError, "q must be"),
    "k_seq_mismatch": (lambda a: a.update(k=a["k"][:, :, :9]), ValueError, "does not match"),
    "k_dim_mismatch": (lambda a: a.update(k=torch.randn(2, 2, 10, 6)), ValueError, "does not match"),
    "k_batch_mismatch": (lambda a: a.update(k=a["k"][:1]), ValueError, "does not match"),
    "gqa_not_multiple": (lambda a: a.update(k=torch.randn(2, 3, 10, 8)), ValueError, "multiple"),
    "q_int": (lambda a: a.update(q=a["q"].to(torch.int32)), TypeError, "float16"),
    "q_float64": (lambda a: a.update(q=a["q"].double()), TypeError, "float16"),
    "mixed_dtypes": (lambda a: a.update(k=a["k"].half()), TypeError, "share a dtype"),
    "q_not_tensor": (lambda a: a.update(q=a["q"].numpy()), TypeError, "torch.Tensor"),
    "guide_float": (lambda a: a.update(guide_index=a["guide_index"].float()), TypeError, "int32/int64"),
    "guide_ndim": (lambda a: a.update(guide_index=a["guide_index"][0]), ValueError, "dimension"),
    "guide_batch": (lambda a: a.update(guide_index=a["guide_index"][:1]), ValueError, "guide_index must be"),
    "count_shape": (lambda a: a.update(guide_count=torch.tensor([3, 1, 1])), ValueError, "guide_count"),
    "count_too_big": (lambda a: a.update(guide_count=torch.tensor([4, 1])), ValueError, "guide_count must lie"),
    "count_negative": (lambda a: a.update(guide_count=torch.tensor([3, -1])), ValueError, "guide_count must lie"),
    "guide_out_of_range_high": (
        lambda a: a.update(guide_index=torch.tensor([[1, 2, 10], [4, 0, 0]])),
        ValueError,
        "out of range",
    ),
    "guide_out_of_range_negative": (
        lambda a: a.update(guide_index=torch.tensor([[1, 2, 3], [-1, 0, 0]])),
        ValueError,
        "out of range",
    ),
    "mask_not_bool": (lambda a: a.update(query_mask=a["query_mask"].int()), TypeError, "bool"),
    "mask_shape": (lambda a: a.update(query_mask=a["query_mask"][:, :9]), ValueError, "query_mask"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_scores_rejects_bad_input(name, backend):
    mutate, exc, match = BAD_INPUTS[name]
    args = valid_args()
    mutate(args)
    with pytest.raises(exc, match=match):
        cross_attention_scores(**args, backend=backend)


def test_scores_padding_guides_are_not_validated(backend, device):
    """Entries past guide_count are padding: any value is accepted and ignored."""
    args = valid_args(device)
    ref = cross_attention_scores(**args, backend=backend)
    args["guide_index"] = torch.tensor([[1, 2, 3], [4, -5, 99]], device=device)
    torch.testing.assert_close(cross_attention_scores(**args, backend=backend), ref, rtol=0, atol=0)


def test_scores_bad_backend_name():
    with pytest.raises(ValueError, match="backend"):
        cross_attention_scores(**valid_args(), backend="cuda")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    """Without TRITON_INTERPRET=1, CPU tensors cannot use Triton: "triton" raises, "auto" falls back."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not launch.interpreting()
    args = valid_args("cpu")
    with pytest.raises(RuntimeError, match="Triton backend cannot run"):
        cross_attention_scores(**args, backend="triton")
    assert launch.choose_backend("auto", torch.device("cpu"), "op") == "torch"

    def no_triton(*_a, **_k):
        raise AssertionError("auto must not pick Triton for CPU tensors without the interpreter")

    monkeypatch.setattr(scoring_mod, "cross_attention_scores_triton", no_triton)
    torch.testing.assert_close(
        cross_attention_scores(**args, backend="auto"), cross_attention_scores(**args, backend="torch"), rtol=0, atol=0
    )


def test_auto_without_triton_installed(monkeypatch):
    monkeypatch.setattr(launch, "TRITON_AVAILABLE", False)
    args = valid_args("cpu")
    with pytest.raises(RuntimeError, match="not installed"):
        cross_attention_scores(**args, backend="triton")
    assert launch.choose_backend("auto", torch.device("cpu"), "op") == "torch"


@pytest.mark.skipif(not (launch.TRITON_AVAILABLE and INTERPRETING), reason="needs triton and TRITON_INTERPRET=1")
def test_auto_picks_triton_under_interpreter(monkeypatch):
    def no_torch(*_a, **_k):
        raise AssertionError("auto must pick Triton under TRITON_INTERPRET=1")

    monkeypatch.setattr(scoring_mod, "cross_attention_scores_torch", no_torch)
    out = cross_attention_scores(**valid_args("cpu"), backend="auto")
    assert out.shape == (2, 10)
