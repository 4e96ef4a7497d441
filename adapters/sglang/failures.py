"""Requests whose prefill lightkv could not compress: the model records them, the scheduler aborts them.

A failure inside lightkv's part of a prefill forward (``LayerGroups.forward``) must not take the server down: the
forward ends with placeholder outputs (:func:`fail_batch`), every request of that batch is recorded here with the
reason, and the scheduler hook :func:`lightkv_adapters.sglang.admission.failed_requests_hook` finishes them with an
abort before their first token is sent, so their slots are released the usual way. The model and the scheduler
share one process (the plugin runs one model replica per GPU), so a process-wide table suffices.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

logger = logging.getLogger(__name__)

_failed: dict[str, str] = {}


def fail_batch(hidden: torch.Tensor, rids: Iterable[str] | None, error: Exception) -> torch.Tensor:
    """lightkv's part of a prefill raised ``error``: records every request of the batch (``rids``) as failed and
    returns zero hidden states shaped as ``hidden`` (the tokens of the view the forward had reached), so that the
    forward completes; the scheduler then aborts the requests before their first token."""
    logger.exception("lightkv: compressing a prefill batch failed; its requests are aborted")
    message = (
        f"lightkv could not compress this request's prefill ({type(error).__name__}: {error}); it was aborted and "
        "the server goes on serving"
    )
    for rid in rids or []:
        _failed[rid] = message
    return torch.zeros_like(hidden)


def pending() -> bool:
    """Whether any recorded failure has not been taken yet."""
    return bool(_failed)


def take(rid: str) -> str | None:
    """The failure recorded for request ``rid``, removed from the table; ``None`` if it did not fail."""
    return _failed.pop(rid, None)
