"""Tolerances for comparing two computations of the same values that round differently (the rule of
:mod:`lightkv_core.kernels.agreement`, applied to whole models).

Two float computations of one value that sum in different orders (another BLAS kernel, another batch shape,
a KV cache instead of a recompute, another implementation) each carry a rounding error. Modelling the
rounding errors as independent and mean-zero, a chain of ``n`` rounded operations has a relative error of at
most ``lambda * sqrt(n) * u`` (``u`` = unit roundoff, half of ``torch.finfo(dtype).eps``) with probability
at least ``1 - 2n exp(-lambda^2 / 2)`` (Higham & Mary, "A new approach to probabilistic rounding error
analysis", SIAM J. Sci. Comput. 41(5), 2019). With ``lambda = 8`` that failure probability is below 1e-10
per compared value for the chains below. The two computations differ by at most the sum of their errors.

A transformer's output is such a chain: ``decoder_chain`` counts its terms from the embeddings to a logit,
and the magnitude is the largest compared value (the norms before the LM head make the error relative).
"""

from __future__ import annotations

import torch

from lightkv_core.kernels.agreement import rounding_tolerance


def decoder_chain(layers: int, hidden: int, intermediate: int, head_dim: int, keys: int) -> int:
    """Rounded operations from the input embeddings to a logit of a pre-norm decoder: per layer two RMS
    norms (``hidden`` each), the q/k/v projection (``hidden``), q.k (``head_dim``), the softmax sum and p.v
    (``keys`` each), the output projection (``hidden``), gate/up (``hidden``) and down (``intermediate``);
    then the final norm and the LM head (``hidden`` each)."""
    per_layer = 2 * hidden + hidden + head_dim + 2 * keys + hidden + hidden + intermediate
    return layers * per_layer + 2 * hidden


def text_model_chain(config: object, keys: int) -> int:
    """:func:`decoder_chain` of a transformers text config (``num_hidden_layers``, ``hidden_size``, ...)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return decoder_chain(config.num_hidden_layers, config.hidden_size, config.intermediate_size, head_dim, keys)


def assert_close_rounding(actual: torch.Tensor, expected: torch.Tensor, chain: int, msg: str = "") -> None:
    """``actual`` equals ``expected`` up to :func:`rounding_tolerance` at the magnitude of ``expected``."""
    tolerance = rounding_tolerance(expected.dtype, chain, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=0, atol=tolerance, msg=msg or None)
