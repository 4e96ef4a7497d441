"""Random LightKV stage inputs for the stage tests, and conversion to the oracle's plain types."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st

from lightkv_core import VisionSpan


@dataclass
class Case:
    """One sample's stage inputs (batch dimension included, B = 1)."""

    hidden: torch.Tensor  # (1, S, D)
    q: torch.Tensor  # (1, H, S, d)
    k: torch.Tensor  # (1, Hk, S, d)
    spans: list[VisionSpan]
    window: int
    ratio: float


@st.composite
def image_layouts(
    draw: st.DrawFn, min_images: int = 0, max_images: int = 3, min_side: int = 1, max_side: int = 12
) -> dict:
    """Structure of a sample: text runs and images (grid, survivors so far, mergeable mask)."""
    n_images = draw(st.integers(min_images, max_images))
    images = []
    for _ in range(n_images):
        rows = draw(st.integers(min_side, max_side))
        cols = draw(st.integers(min_side, max_side))
        images.append(
            dict(
                rows=rows,
                cols=cols,
                keep_fraction=draw(st.sampled_from([1.0, 1.0, 0.8, 0.5])),
                shuffle=draw(st.booleans()),
                structural_fraction=draw(st.sampled_from([0.0, 0.0, 0.1])),
            )
        )
    texts = [draw(st.integers(0, 6)) for _ in range(n_images)] + [draw(st.integers(1, 6))]
    return dict(images=images, texts=texts)


def build_case(
    layout: dict,
    *,
    seed: int,
    window: int,
    ratio: float,
    dim: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    palette: int = 0,
) -> Case:
    """Materialise a layout with random tensors. ``palette > 0`` draws hidden rows from that many
    random +-1 vectors (equal norms, exact dot products) so similarity ties are exact in any precision."""
    rng = np.random.default_rng(seed)
    spans, position = [], 0
    for text, image in zip(layout["texts"], layout["images"], strict=False):
        position += text
        cells = image["rows"] * image["cols"]
        count = max(1, round(cells * image["keep_fraction"]))
        coords = np.sort(rng.choice(cells, size=count, replace=False))
        if image["shuffle"]:
            rng.shuffle(coords)
        mergeable = rng.random(count) >= image["structural_fraction"]
        full = count == cells and not image["shuffle"] and mergeable.all()
        spans.append(
            VisionSpan(
                position,
                position + count,
                image["rows"],
                image["cols"],
                coords=None if full else torch.from_numpy(coords).long(),
                mergeable=None if mergeable.all() else torch.from_numpy(mergeable),
            )
        )
        position += count
    seq = position + layout["texts"][-1]
    if palette:
        patterns = rng.choice([-1.0, 1.0], size=(palette, dim))
        hidden = patterns[rng.integers(0, palette, size=seq)]
    else:
        hidden = rng.standard_normal((seq, dim))
    q = rng.standard_normal((heads, seq, head_dim))
    k = rng.standard_normal((kv_heads, seq, head_dim))

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(dtype)[None]

    return Case(tensor(hidden), tensor(q), tensor(k), spans, window, ratio)


def oracle_spans(spans: list[VisionSpan]) -> list[dict]:
    """The oracle's span dicts for library spans."""
    return [
        dict(
            start=s.start,
            end=s.end,
            rows=s.rows,
            cols=s.cols,
            coords=s.coords_or_default().tolist(),
            mergeable=s.mergeable_or_default().tolist(),
        )
        for s in spans
    ]


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """float64 copy of the (already quantised) values of ``t``, batch dimension dropped."""
    return t[0].to(torch.float64).cpu().numpy()
