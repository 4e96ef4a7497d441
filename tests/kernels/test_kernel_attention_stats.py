"""Property tests of the attention statistics kernel against the float64 oracle, for both backends."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.backends import BACKENDS, triton_skip_reason
from helpers.kernel_inputs import ALL_DTYPES, make_heads, to_np
from helpers.oracle import oracle_attention_statistics
from hypothesis import given, settings
from hypothesis import strategies as st

from lightkv_core.kernels.attention_stats import attention_statistics

pytestmark = pytest.mark.usefixtures("single_thread")


@st.composite
def stats_cases(draw, dtypes=ALL_DTYPES):
    heads = draw(st.sampled_from([1, 2, 3, 4]))
    return dict(
        batch=draw(st.integers(1, 2)),
        heads=heads,
        kv_heads=draw(st.sampled_from([h for h in range(1, heads + 1) if heads % h == 0])),
        head_dim=draw(st.sampled_from([8, 16, 40])),
        seq=draw(st.integers(1, 70)),
        n_query=draw(st.integers(1, 20)),
        n_key=draw(st.integers(1, 40)),
        all_keys=draw(st.booleans()),  # key_index = every position (then n_key = S)
        unused_frac=draw(st.sampled_from([0.0, 0.2, 0.6])),
        key_mask=draw(st.sampled_from(["random", "empty_row", "none", "all"])),
        causal=draw(st.booleans()),
        dtype=draw(st.sampled_from(dtypes)),
        q_layout=draw(st.sampled_from(["contiguous", "bshd", "wide"])),
        k_layout=draw(st.sampled_from(["contiguous", "bshd", "wide"])),
        mag=draw(st.sampled_from([0.3, 1.0, 2.5])),
        scale=draw(st.one_of(st.none(), st.floats(0.02, 0.6))),
        heads_mode=draw(st.sampled_from(["per_head", "mean"])),
        index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def random_index(gen: torch.Generator, batch: int, width: int, seq: int, unused_frac: float) -> torch.Tensor:
    """(B, width) positions in [0, S) (repeats likely), a fraction ``unused_frac`` of them -1."""
    index = torch.randint(0, seq, (batch, width), generator=gen)
    return index.masked_fill(torch.rand(batch, width, generator=gen) < unused_frac, -1)


def build(case: dict, device: str) -> dict:
    gen = torch.Generator().manual_seed(case["seed"])
    b, h, hk, d, s = (case[n] for n in ("batch", "heads", "kv_heads", "head_dim", "seq"))
    q = make_heads(gen, (b, h, s, d), case["q_layout"], case["dtype"], case["mag"], device)
    k = make_heads(gen, (b, hk, s, d), case["k_layout"], case["dtype"], case["mag"], device)
    query_index = random_index(gen, b, case["n_query"], s, case["unused_frac"])
    if case["all_keys"]:
        key_index = torch.arange(s).expand(b, s).clone()
    else:
        key_index = random_index(gen, b, case["n_key"], s, case["unused_frac"])
    key_mask = None
    if case["key_mask"] == "all":
        key_mask = torch.ones(b, s, dtype=torch.bool)
    elif case["key_mask"] in ("random", "empty_row"):
        key_mask = torch.rand(b, s, generator=gen) < 0.6
        if case["key_mask"] == "empty_row":
            key_mask[0] = False
    return dict(
        q=q,
        k=k,
        query_index=query_index.to(case["index_dtype"]).to(device),
        key_index=key_index.to(case["index_dtype"]).to(device),
        key_mask=None if key_mask is None else key_mask.to(device),
        causal=case["causal"],
        scale=case["scale"],
        heads=case["heads_mode"],
    )


def run_np(args: dict) -> tuple[np.ndarray, float]:
    """The oracle's answer, and the largest |logit| (what the float32 error grows with)."""
    qn, kn = to_np(args["q"]), to_np(args["k"])
    scale = 1.0 / math.sqrt(qn.shape[-1]) if args["scale"] is None else args["scale"]
    mask = None if args["key_mask"] is None else to_np(args["key_mask"])
    ref = oracle_attention_statistics(
        qn, kn, to_np(args["query_index"]), to_np(args["key_index"]), mask, args["causal"], scale, args["heads"]
    )
    keys = np.repeat(kn, qn.shape[1] // kn.shape[1], axis=1)
    worst = float(np.abs(scale * qn @ keys.transpose(0, 1, 3, 2)).max()) if qn.size else 0.0
    return ref, worst


@settings(max_examples=40)
@given(data=st.data())
def test_statistics_match_oracle(backend, device, data):
    case = data.draw(stats_cases())
    args = build(case, device)
    out = attention_statistics(**args, backend=backend)
    b, h = case["batch"], case["heads"]
    n_key = args["key_index"].shape[1]
    assert out.dtype == torch.float32
    assert out.device == args["q"].device
    assert out.shape == ((b, h, n_key) if case["heads_mode"] == "per_head" else (b, n_key))
    got = to_np(out)
    ref, worst = run_np(args)
    assert np.all(np.isfinite(got))
    # Unused key entries report exactly 0.
    unused = to_np(args["key_index"]) < 0
    assert np.all((got if got.ndim == 2 else got.transpose(0, 2, 1))[unused] == 0.0)
    # float32 logits: the relative error of each probability grows with the logit size.
    tol = 2e-6 * (1.0 + worst + math.log(case["seq"] + 1))
    np.testing.assert_allclose(got, ref, rtol=tol, atol=1e-8 * max(1.0, float(np.abs(ref).max(initial=0.0))))


@settings(max_examples=25)
@given(data=st.data())
def test_rows_are_distributions_and_mean_is_per_head_mean(backend, device, data):
    """Every key reported, all keys allowed: each used query row adds 1 per head (causal or not, as a row
    always sees itself); ``heads="mean"`` is exactly the per-head output averaged over heads."""
    case = data.draw(stats_cases())
    case.update(all_keys=True, key_mask=data.draw(st.sampled_from(["none", "all"])))
    args = build(case, device)
    args["heads"] = "per_head"
    per_head = attention_statistics(**args, backend=backend)
    used = (args["query_index"] >= 0).sum(dim=1).float()  # (B,)
    expected = used[:, None].expand(case["batch"], case["heads"]).cpu()
    torch.testing.assert_close(per_head.sum(dim=-1).cpu(), expected, rtol=1e-5, atol=1e-5)
    args["heads"] = "mean"
    mean = attention_statistics(**args, backend=backend)
    torch.testing.assert_close(mean, per_head.mean(dim=1), rtol=0, atol=0)


@pytest.mark.skipif(triton_skip_reason() is not None, reason=triton_skip_reason() or "")
@settings(max_examples=25)
@given(data=st.data())
def test_triton_matches_torch(device, data):
    assert BACKENDS == ("torch", "triton")
    args = build(data.draw(stats_cases()), device)
    ref = attention_statistics(**args, backend="torch")
    got = attention_statistics(**args, backend="triton")
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_several_tiles_of_every_kind(backend, device, causal):
    """S, Q and C each span several key / query / column tiles (the kernels' blocks are at most 64)."""
    gen = torch.Generator().manual_seed(3)
    s = 150
    args = dict(
        q=torch.randn(1, 4, s, 40, generator=gen).half().to(device),
        k=torch.randn(1, 2, s, 40, generator=gen).half().to(device),
        query_index=random_index(gen, 1, 70, s, 0.1).to(device),
        key_index=torch.cat([torch.arange(s), torch.tensor([-1, 5, 149])])[None].to(device),
        key_mask=(torch.rand(1, s, generator=gen) < 0.8).to(device),
        causal=causal,
        scale=0.2,
        heads="per_head",
    )
    ref, worst = run_np(args)
    got = to_np(attention_statistics(**args, backend=backend))
    np.testing.assert_allclose(got, ref, rtol=2e-6 * (1.0 + worst + math.log(s)), atol=1e-8 * float(ref.max()))


def test_rows_without_keys_add_nothing(backend, device):
    """A key mask with no allowed key gives zeros (no NaN); with causal, row 0 sees only key 0."""
    args = valid_args(device)
    args["key_mask"] = torch.zeros(2, 10, dtype=torch.bool, device=device)
    out = attention_statistics(**args, backend=backend)
    assert out.eq(0).all()
    args = valid_args(device)
    args["key_mask"][:, 0] = False
    args["query_index"] = torch.tensor([[0, 0, 5], [0, -1, -1]], device=device)
    args["key_index"] = torch.arange(10, device=device).expand(2, 10)
    out = attention_statistics(**args, causal=True, backend=backend).cpu()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(dim=-1), torch.tensor([[1.0] * 4, [0.0] * 4]), rtol=1e-5, atol=1e-6)


def test_duplicates_count_twice(backend, device):
    args = valid_args(device)
    args["query_index"] = torch.tensor([[7, -1, -1], [2, -1, -1]], device=device)
    once = attention_statistics(**args, backend=backend)
    args["query_index"] = torch.tensor([[7, 7, -1], [2, -1, 2]], device=device)
    twice = attention_statistics(**args, backend=backend)
    torch.testing.assert_close(twice, 2 * once, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("n_query", "n_key"), [(0, 5), (3, 0), (0, 0)])
@pytest.mark.parametrize("heads", ["per_head", "mean"])
def test_empty_query_or_key_sets(backend, device, n_query, n_key, heads):
    args = valid_args(device)
    args["query_index"] = torch.zeros(2, n_query, dtype=torch.int64, device=device)
    args["key_index"] = torch.zeros(2, n_key, dtype=torch.int64, device=device)
    out = attention_statistics(**args, heads=heads, backend=backend)
    assert out.shape == ((2, 4, n_key) if heads == "per_head" else (2, n_key))
    assert out.dtype == torch.float32 and out.eq(0).all()


# ------------------------------------------------------------------------------------------------------
# Launch-wrapper checks
# ------------------------------------------------------------------------------------------------------


def valid_args(device="cpu"):
    gen = torch.Generator().manual_seed(0)
    return dict(
        q=torch.randn(2, 4, 10, 8, generator=gen).to(device),
        k=torch.randn(2, 2, 10, 8, generator=gen).to(device),
        query_index=torch.tensor([[9, 3, -1], [9, 9, 0]], device=device),
        key_index=torch.tensor([[1, 2, 3, -1], [4, 0, 9, 9]], device=device),
        key_mask=torch.ones(2, 10, dtype=torch.bool, device=device),
    )


BAD_INPUTS = {
    "q_int": (lambda a: a.update(q=a["q"].long()), TypeError, "float16, bfloat16 or float32"),
    "q_float64": (lambda a: a.update(q=a["q"].double(), k=a["k"].double()), TypeError, "float16, bfloat16"),
    "q_not_tensor": (lambda a: a.update(q=a["q"].numpy()), TypeError, "torch.Tensor"),
    "dtype_mismatch": (lambda a: a.update(k=a["k"].half()), TypeError, "share a dtype"),
    "q_3d": (lambda a: a.update(q=a["q"][0]), ValueError, r"\(B, H, S, d\)"),
    "k_3d": (lambda a: a.update(k=a["k"][0]), ValueError, r"\(B, H, S, d\)"),
    "k_batch": (lambda a: a.update(k=a["k"][:1]), ValueError, "does not match"),
    "k_length": (lambda a: a.update(k=a["k"][:, :, :9]), ValueError, "does not match"),
    "head_dim": (lambda a: a.update(k=a["k"][..., :4]), ValueError, "does not match"),
    "heads_not_multiple": (lambda a: a.update(k=torch.randn(2, 3, 10, 8)), ValueError, "not a multiple"),
    "query_float": (lambda a: a.update(query_index=a["query_index"].float()), TypeError, "int32/int64"),
    "query_ndim": (lambda a: a.update(query_index=a["query_index"][0]), ValueError, "dimension"),
    "query_batch": (lambda a: a.update(query_index=a["query_index"][:1]), ValueError, "query_index must be"),
    "query_high": (lambda a: a.update(query_index=torch.tensor([[10, 3, -1], [0, 0, 0]])), ValueError, "out of range"),
    "query_low": (lambda a: a.update(query_index=torch.tensor([[-2, 3, -1], [0, 0, 0]])), ValueError, "out of range"),
    "key_not_tensor": (lambda a: a.update(key_index=[[1, 2]]), TypeError, "torch.Tensor"),
    "key_ndim": (lambda a: a.update(key_index=a["key_index"][None]), ValueError, "dimension"),
    "key_batch": (lambda a: a.update(key_index=a["key_index"][:1]), ValueError, "key_index must be"),
    "key_high": (lambda a: a.update(key_index=torch.tensor([[1, 10], [0, 0]])), ValueError, "key_index out of range"),
    "key_low": (lambda a: a.update(key_index=torch.tensor([[1, -3], [0, 0]])), ValueError, "key_index out of range"),
    "mask_not_bool": (lambda a: a.update(key_mask=a["key_mask"].int()), TypeError, "key_mask must be a bool"),
    "mask_shape": (lambda a: a.update(key_mask=a["key_mask"][:, :9]), ValueError, "key_mask must be"),
    "heads_value": (lambda a: a.update(heads="sum"), ValueError, "heads must be one of"),
    "backend_name": (lambda a: a.update(backend="cuda"), ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_statistics_rejects_bad_input(name, backend):
    mutate, exc, match = BAD_INPUTS[name]
    args = dict(valid_args(), backend=backend)
    mutate(args)
    with pytest.raises(exc, match=match):
        attention_statistics(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_statistics_rejects_mixed_devices():
    args = valid_args()
    args["key_index"] = args["key_index"].cuda()
    with pytest.raises(ValueError, match="one device"):
        attention_statistics(**args)
