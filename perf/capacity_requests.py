"""Simulated SGLang requests (:class:`FakeReq`) of the capacity benchmark (:mod:`lightkv_perf.capacity`) and the
layer-group pools' tests: the parts of SGLang's ``Req`` that the pools and their planner read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from lightkv_core.budget import MODEL_SHAPES
from lightkv_core.spans import VisionSpan

#: LLaVA-NeXT's KV shape and images: five 24x24 grids.
SHAPE = MODEL_SHAPES["llava-next"]
#: Text tokens after a LLaVA-NeXT-like request's images.
TEXT_AFTER_IMAGES = 100
#: Tokens of a text-only request.
TEXT_ONLY_TOKENS = 1000


@dataclass(frozen=True, eq=False)
class FakeReq:
    """Stands in for SGLang's ``Req``: the prompt (``full_untruncated_fill_ids``), its vision spans (read by the
    planner), its decode budget, a label for tallies and the prefix it matched in a radix tree."""

    spans: Sequence[VisionSpan]
    full_untruncated_fill_ids: range
    max_new_tokens: int = 0
    kind: str = ""
    #: leading prompt tokens matched in a radix tree (their slots are the tree's)
    prefix_len: int = 0


def llava_next_request() -> FakeReq:
    """Five 24x24 images (2,880 vision tokens), then 100 text tokens."""
    rows, cols = SHAPE.grid
    grid = rows * cols
    spans = tuple(VisionSpan(i * grid, (i + 1) * grid, rows, cols) for i in range(SHAPE.images))
    return FakeReq(spans, range(SHAPE.images * grid + TEXT_AFTER_IMAGES), kind="llava-next")


def text_request() -> FakeReq:
    """1,000 text tokens, no image."""
    return FakeReq((), range(TEXT_ONLY_TOKENS), kind="text")


def with_system_prompt(req: FakeReq, tokens: int) -> FakeReq:
    """``req`` after a system prompt of ``tokens`` text tokens that every request of a server shares (the prompt
    grows by ``tokens``, its images move after them)."""
    spans = tuple(replace(span, start=span.start + tokens, end=span.end + tokens) for span in req.spans)
    return replace(req, spans=spans, full_untruncated_fill_ids=range(len(req.full_untruncated_fill_ids) + tokens))
