"""What images a forward of the multimodal model brings, and the grid of each.

``generate()`` encodes the images once, before the prefill (``get_image_features`` / ``get_video_features``),
drops the grid arguments (``image_grid_thw``, ``image_sizes``, ...) and hands the features on as
``mm_encoder_outputs``, expanded for beams and extra return sequences: each sample's group of per-image feature
tensors repeated, the very same tensor objects. :class:`GridRecorder` remembers the grid of every feature tensor
it saw computed, so the grids of any forward (expanded, repeated at every ``use_cache=False`` step, or the
user's own precomputed features) are those of the tensors it receives.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Sequence

import torch
from torch import nn

#: Pixel inputs of the multimodal models' forwards.
PIXEL_ARGUMENTS = ("pixel_values", "pixel_values_videos")


def modality_of(method: str) -> str:
    """``"image"`` for ``get_image_features``, ``"video"`` for ``get_video_features``."""
    return method.removeprefix("get_").removesuffix("_features")


def brings_images(inputs: dict) -> bool:
    """Whether a forward of the multimodal model, given ``inputs`` by name, brings images or videos: pixels, or
    precomputed features in ``mm_encoder_outputs``. Image tokens alone are text to the stock model."""
    for name in PIXEL_ARGUMENTS:
        pixels = inputs.get(name)
        if pixels is not None and (not isinstance(pixels, torch.Tensor) or pixels.numel() > 0):
            return True
    encoded = inputs.get("mm_encoder_outputs") or {}
    return any(output is not None for output in encoded.values())


def check_unpatched(base: nn.Module, grid_arguments: Sequence[tuple[str, str]]) -> None:
    """Raises RuntimeError if a feature method of ``grid_arguments`` is already patched on the instance ``base``."""
    for method, _ in grid_arguments:
        if method in vars(base):
            raise RuntimeError(f"{type(base).__name__}.{method} is already patched on this instance")


class GridRecorder:
    """Wraps the base model's feature methods (on the instance) to remember the grid row of every per-image
    feature tensor they return.

    Args:
        base: the multimodal base model (``model.model``).
        grid_arguments: ``(method, argument)`` pairs, e.g. ``("get_image_features", "image_grid_thw")``.

    Raises:
        RuntimeError if one of the methods is already patched on this instance (nothing is wrapped then).
    """

    def __init__(self, base: nn.Module, grid_arguments: Sequence[tuple[str, str]]) -> None:
        self.base = base
        self.grid_arguments = tuple(grid_arguments)
        self._grids: dict[int, tuple[weakref.ref, torch.Tensor]] = {}
        check_unpatched(base, self.grid_arguments)
        for method, argument in self.grid_arguments:
            setattr(base, method, self._recording(getattr(base, method), argument))

    def remove(self) -> None:
        """Give the base model its own feature methods back."""
        for method, _ in self.grid_arguments:
            vars(self.base).pop(method, None)

    def _recording(self, original, argument: str):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def recording(*args, **kwargs):
            output = original(*args, **kwargs)
            grid = signature.bind_partial(*args, **kwargs).arguments.get(argument)
            pieces = getattr(output, "pooler_output", None)
            if isinstance(grid, torch.Tensor) and isinstance(pieces, (list, tuple)) and len(pieces) == len(grid):
                self._forget_dead()
                for piece, row in zip(pieces, grid, strict=True):
                    self._grids[id(piece)] = (weakref.ref(piece), row)
            return output

        return recording

    def _forget_dead(self) -> None:
        dead = [key for key, (ref, _) in self._grids.items() if ref() is None]
        for key in dead:
            del self._grids[key]

    def grids(self, encoded: dict | None) -> dict[str, torch.Tensor]:
        """The grid argument of every modality in ``encoded`` (a forward's ``mm_encoder_outputs``) whose feature
        tensors were all computed by a wrapped method: ``{argument: (N, ...) grids}``, one row per tensor."""
        found: dict[str, torch.Tensor] = {}
        for method, argument in self.grid_arguments:
            output = (encoded or {}).get(modality_of(method))
            pieces = getattr(output, "pooler_output", None)
            if not isinstance(pieces, (list, tuple)) or not pieces:
                continue
            rows = []
            for piece in pieces:
                ref, row = self._grids.get(id(piece), (None, None))
                if ref is None or ref() is not piece:
                    break
                rows.append(row)
            else:
                found[argument] = torch.stack(rows)
        return found
