"""Whether a Triton kernel's output equals its PyTorch fallback's, by one tolerance rule: what autotune, the
benchmarks and the tests all check before they trust (or time) a kernel.

Both implementations compute in float32 from the same inputs (products of fp16/bf16 values are exact in
float32); they differ in the order they sum. Modelling rounding errors as independent and mean-zero, a chain of
``n`` rounded float32 operations has a relative error of at most ``lambda * sqrt(n) * u`` (``u`` the unit
roundoff) with probability at least ``1 - 2n exp(-lambda^2 / 2)`` (Higham & Mary, SIAM J. Sci. Comput. 41(5),
2019); ``lambda = 8`` puts that below 1e-10 per value. Two such computations differ by at most the sum of their
errors, plus one rounding of the output to its dtype. Softmax outputs carry the error of their logits relative
to the output, so their magnitude is scaled by the largest logit (Cauchy-Schwarz bound ``|q| |k| scale``).
"""

from __future__ import annotations

import math

import torch

#: Standard deviations of the probabilistic bound (see the module docstring).
CONFIDENCE = 8.0


class KernelMismatch(AssertionError):
    """A kernel's output differs from its fallback's by more than rounding explains."""


def rounding_tolerance(dtype: torch.dtype, chain: int, magnitude: float) -> float:
    """Largest difference expected between two roundings of values of at most ``magnitude``, each the end of a
    chain of ``chain`` rounded operations in ``dtype``."""
    unit_roundoff = torch.finfo(dtype).eps / 2
    return 2 * CONFIDENCE * math.sqrt(chain) * unit_roundoff * magnitude


def kernel_tolerance(output_dtype: torch.dtype, chain: int, magnitude: float, roundings: int = 1) -> float:
    """The rule: float32 chains of ``chain`` operations in both implementations, then ``roundings`` roundings to
    ``output_dtype`` (each may round the other way: one ``eps`` of the output dtype each)."""
    tolerance = rounding_tolerance(torch.float32, chain, magnitude)
    if output_dtype != torch.float32:
        tolerance += roundings * torch.finfo(output_dtype).eps * magnitude
    return tolerance


def check_close(
    name: str,
    actual: torch.Tensor,
    expected: torch.Tensor,
    chain: int,
    magnitude: float | None = None,
    rounded_to: tuple[torch.dtype, int] | None = None,
) -> float:
    """``actual`` equals ``expected`` within :func:`kernel_tolerance` at ``magnitude`` (default: the largest
    ``|expected|``) and ``rounded_to`` (``(dtype, roundings)`` of ``actual``'s values before they were widened;
    default: one rounding to ``expected``'s dtype); returns the largest difference.

    Raises:
        KernelMismatch naming ``name``, the difference and the tolerance.
    """
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise KernelMismatch(
            f"{name}: {tuple(actual.shape)} {actual.dtype} instead of {tuple(expected.shape)} {expected.dtype}"
        )
    if actual.numel() == 0:
        return 0.0
    if magnitude is None:
        magnitude = float(expected.abs().max())
    dtype, roundings = rounded_to or (expected.dtype, 1)
    tolerance = kernel_tolerance(dtype, chain, magnitude, roundings)
    error = float((actual.double() - expected.double()).abs().max())
    if not error <= tolerance:
        raise KernelMismatch(f"{name}: differs from the fallback by {error:.3g} (tolerance {tolerance:.3g})")
    return error


def logit_bound(q: torch.Tensor, k: torch.Tensor, scale: float) -> float:
    """An upper bound on ``|q_i . k_j| * scale`` over all rows (``(..., d)`` tensors), at least 1."""
    q_norm = float(q.float().norm(dim=-1).max()) if q.numel() else 0.0
    k_norm = float(k.float().norm(dim=-1).max()) if k.numel() else 0.0
    return max(1.0, q_norm * k_norm * abs(scale))


def check_scores(
    actual: torch.Tensor,
    expected: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    guides: int,
    rounded_to: tuple[torch.dtype, int] | None = None,
) -> float:
    """:func:`~lightkv_core.kernels.cross_attention_scores` against its fallback: a dot of ``d``, a log-sum-exp
    over ``S`` queries and a sum over ``guides`` columns per score (``rounded_to``: other code whose logits were
    rounded to their dtype, see :func:`check_close`)."""
    chain = q.shape[-1] + q.shape[-2] + guides
    magnitude = float(expected.abs().max()) * logit_bound(q, k, scale) if expected.numel() else 0.0
    return check_close("cross_attention_scores", actual, expected, chain, magnitude, rounded_to)


def check_attention_statistics(
    actual: torch.Tensor, expected: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float, queries: int
) -> float:
    """:func:`~lightkv_core.kernels.attention_statistics` against its fallback: a dot of ``d``, a log-sum-exp over
    ``S`` keys and a sum over ``queries`` rows per value."""
    chain = q.shape[-1] + k.shape[-2] + queries
    magnitude = float(expected.abs().max()) * logit_bound(q, k, scale) if expected.numel() else 0.0
    return check_close("attention_statistics", actual, expected, chain, magnitude)


def check_merge(actual: torch.Tensor, expected: torch.Tensor, src_offsets: torch.Tensor) -> float:
    """:func:`~lightkv_core.kernels.merge_compact` against its fallback: a weighted sum over a slot's sources and
    itself, then a division."""
    sources = int((src_offsets[1:] - src_offsets[:-1]).max()) if src_offsets.numel() > 1 else 0
    return check_close("merge_compact", actual, expected, 2 * (sources + 1) + 1)


def check_window_match(
    match_args: tuple[torch.Tensor, ...],
    result: tuple[torch.Tensor, torch.Tensor],
    expected: tuple[torch.Tensor, torch.Tensor],
    similarity_dtype: torch.dtype = torch.float32,
    roundings: int = 1,
) -> int:
    """:func:`~lightkv_core.kernels.window_best_match` against its fallback; returns how many best matches differ
    (near-ties may pick another B token).

    A best match must lie in its A token's window, and both its similarity and the cosine of the pair it names
    (recomputed in float64) must equal the fallback's maximum: cosines of ``D``-wide rows (a dot and two norms),
    computed in float32 (the kernels) or with ``roundings`` roundings to ``similarity_dtype`` (other code).

    Raises:
        KernelMismatch naming what disagrees.
    """
    x, a_rows, a_offsets, b_rows, b_offsets = match_args
    best, sim = result
    expected_best, expected_sim = expected
    if best.shape != expected_best.shape or sim.shape != expected_sim.shape:
        raise KernelMismatch(
            f"window_best_match: shapes {tuple(best.shape)}, {tuple(sim.shape)} instead of {tuple(expected_best.shape)}"
        )
    if best.numel() == 0:
        return 0
    windows = a_offsets.numel() - 1
    a_window = torch.repeat_interleave(torch.arange(windows, device=x.device), a_offsets[1:] - a_offsets[:-1])
    b_window = torch.repeat_interleave(torch.arange(windows, device=x.device), b_offsets[1:] - b_offsets[:-1])
    if not bool((b_window[best] == a_window).all()):
        raise KernelMismatch("window_best_match: a best match lies outside its A token's window")
    a, b = x[a_rows].double(), x[b_rows[best]].double()
    cosine = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)
    chain = 3 * x.shape[1]
    rounded_to = (similarity_dtype, roundings)
    check_close("window_best_match: similarity", sim, expected_sim, chain, 1.0, rounded_to)
    check_close("window_best_match: cosine of the chosen pair", cosine.float(), expected_sim, chain, 1.0, rounded_to)
    return int((best != expected_best).sum())
