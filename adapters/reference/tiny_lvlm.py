"""The tiny LVLM this project trains and ships: a fixed vision stem, a linear projector and the
reference :class:`~lightkv_adapters.reference.decoder.Decoder`, answering shapes-world questions.

Prompt layout (as in LLaVA): ``<bos> <image> x 256 question ... ?``; the answer follows, ending with ``.``.
The shipped weights (``weights/tiny-lvlm.safetensors``, float32) hold the projector and the decoder; the
stem has no parameters (patch pixels plus one-hot row and column of each patch).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightkv_adapters.reference import shapes_world as world
from lightkv_adapters.reference.decoder import Decoder, DecoderConfig
from lightkv_core.errors import UsageError
from lightkv_core.methods import CompressionMethod
from lightkv_core.spans import VisionSpan
from lightkv_core.stats import PrefillStats

WEIGHTS = Path(__file__).parent / "weights" / "tiny-lvlm.safetensors"
STEM_DIM = world.PATCH * world.PATCH * 4 + 4 + 2 * 4 + 5 * 4 + 2 * world.GRID + 2 * world.CELLS
SATURATED = 0.3  # objects are saturated colours, backgrounds are near-grey
VISION_TOKENS = world.GRID * world.GRID
MAX_ANSWER_TOKENS = world.MAX_ANSWER_WORDS

DEFAULT_DECODER = DecoderConfig(
    vocab_size=len(world.VOCAB),
    hidden_size=128,
    intermediate_size=352,
    num_layers=8,
    num_heads=4,
    num_kv_heads=2,
)


def vision_stem(images: np.ndarray, origins: np.ndarray | None = None) -> torch.Tensor:
    """``(N, side, side, 3)`` images to ``(N, grid * grid, STEM_DIM)`` float32 features, like a small frozen
    conv stem (``grid = side // PATCH``, 16 for the full 64 x 64 images).

    Per patch: its centred pixels (48); a soft foreground mask per pixel from colour saturation (16); the
    mean foreground colour and foreground fraction (4); the same colour and fraction averaged over the
    3 x 3 and the 5 x 5 patch neighbourhood (8, zero padded); the same colour and fraction of the patch's
    4 x 4-patch block and of the blocks left of, right of, above and below it (20, zero outside the image:
    the context a ViT's global attention would give; the context features are zero on background patches,
    so what is known about an object lives on its own patches only); a two-scale position code: one-hots of the
    patch row and column in a 16 x 16 frame (32) and of the 4 x 4-patch block row and column (8).
    ``origins``: ``(N, 2)`` (row, col) of each image's top-left patch in that frame (default 0; training
    places smaller images at random block-aligned origins).
    """
    pixels = torch.from_numpy(world.patchify(images))  # (N, grid * grid, 48) in [0, 1]
    batch, tokens = pixels.shape[:2]
    grid = images.shape[1] // world.PATCH
    rgb = pixels.view(batch, tokens, world.PATCH * world.PATCH, 3)
    saturation = rgb.max(dim=3).values - rgb.min(dim=3).values
    foreground = ((saturation - SATURATED) * 10.0).clamp(0.0, 1.0)  # (N, tokens, 16)
    fraction = foreground.mean(dim=2, keepdim=True)
    colour = (rgb * foreground[..., None]).sum(dim=2) / foreground.sum(dim=2, keepdim=True).clamp(min=1.0)
    local = torch.cat([colour, fraction], dim=2)  # (N, tokens, 4)
    planes = local.view(batch, grid, grid, 4).permute(0, 3, 1, 2)
    context = [
        nn.functional.avg_pool2d(planes, size, stride=1, padding=size // 2).permute(0, 2, 3, 1).reshape(batch, -1, 4)
        for size in (3, 5)
    ]
    on_object = (fraction > 0).float()  # context only on object patches: background patches carry no summary
    context = [c * on_object for c in context]
    blocks = _block_context(rgb, foreground, grid) * on_object
    origins = torch.zeros(batch, 2, dtype=torch.long) if origins is None else torch.as_tensor(origins).long()
    if bool((origins < 0).any()) or bool((origins + grid > world.GRID).any()):
        raise ValueError(f"image origins must keep a {grid}x{grid} image inside the {world.GRID}x{world.GRID} frame")
    index = torch.arange(tokens)
    row = origins[:, :1] + index // grid
    col = origins[:, 1:] + index % grid
    position = [
        nn.functional.one_hot(value // scale, world.GRID // scale).float()
        for scale in (1, world.CELL_PATCHES)
        for value in (row, col)
    ]
    return torch.cat([pixels * 2.0 - 1.0, foreground, local, *context, blocks, *position], dim=2)


def _block_context(rgb: torch.Tensor, foreground: torch.Tensor, grid: int) -> torch.Tensor:
    """``(N, grid * grid, 20)``: foreground colour and fraction of every patch's block, then of the blocks
    left, right, above and below it (zeros beyond the image)."""
    batch, side = rgb.shape[0], world.CELL_PATCHES
    blocks = grid // side
    weighted = (rgb * foreground[..., None]).view(batch, blocks, side, blocks, side, -1, 3).sum(dim=(2, 4, 5))
    mass = foreground.view(batch, blocks, side, blocks, side, -1).sum(dim=(2, 4, 5))
    colour = weighted / mass[..., None].clamp(min=1.0)
    fraction = mass / (side * side * world.PATCH * world.PATCH)
    summary = torch.cat([colour, fraction[..., None]], dim=3)  # (N, blocks, blocks, 4)
    padded = nn.functional.pad(summary, (0, 0, 1, 1, 1, 1))
    shifted = [padded[:, 1 + dr : 1 + dr + blocks, 1 + dc : 1 + dc + blocks] for dr, dc in
               ((0, 0), (0, -1), (0, 1), (-1, 0), (1, 0))]  # fmt: skip
    per_block = torch.cat(shifted, dim=3)  # (N, blocks, blocks, 20)
    per_patch = per_block.repeat_interleave(side, dim=1).repeat_interleave(side, dim=2)
    return per_patch.reshape(batch, grid * grid, -1)


@dataclass
class Batch:
    """A left- or right-padded batch. ``embeds``: ``(B, S, D)``; ``mask``:
    ``(B, S)`` bool real tokens; ``spans``: one ``[VisionSpan]`` per sample."""

    embeds: torch.Tensor
    mask: torch.Tensor
    spans: list[list[VisionSpan]]


class TinyLVLM(nn.Module):
    def __init__(self, config: DecoderConfig = DEFAULT_DECODER) -> None:
        super().__init__()
        self.config = config
        self.projector = nn.Linear(STEM_DIM, config.hidden_size)
        self.decoder = Decoder(config)

    @classmethod
    def load(cls, path: str | Path = WEIGHTS) -> TinyLVLM:
        """The model stored at ``path`` (default: the shipped weights).

        Raises:
            FileNotFoundError: there is no file at ``path``.
            WeightsError: the file is not a tiny LVLM saved by :meth:`save` (not safetensors, no or bad
                ``decoder_config`` metadata, tensors of another model).
        """
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            what = "a folder" if path.is_dir() else "no such file"
            raise FileNotFoundError(f"no tiny-LVLM weights at {path} ({what}); {_train_hint(path)}")
        try:
            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
        except SafetensorError as error:
            raise WeightsError(path, f"not a safetensors file ({error})") from None
        if "decoder_config" not in metadata:
            raise WeightsError(path, "a safetensors file without lightkv's 'decoder_config' metadata")
        try:
            config = DecoderConfig(**json.loads(metadata["decoder_config"]))
        except (ValueError, TypeError, ZeroDivisionError) as error:  # bad JSON, bad or missing fields, bad values
            raise WeightsError(path, f"its 'decoder_config' metadata is not a decoder config ({error})") from None
        if config.vocab_size != len(world.VOCAB):
            vocabulary = f"{config.vocab_size} tokens, not the shapes world's {len(world.VOCAB)}"
            raise WeightsError(path, f"its vocabulary has {vocabulary}")
        model = cls(config)
        mismatch = _tensor_mismatch(model.state_dict(), tensors)
        if mismatch:
            raise WeightsError(path, f"its tensors do not match its decoder_config ({mismatch})")
        model.load_state_dict(tensors, strict=True)
        return model.eval()

    def save(self, path: str | Path, **metadata: str) -> None:
        from safetensors.torch import save_file

        tensors = {name: t.detach().contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"decoder_config": json.dumps(asdict(self.config)), **metadata})

    def build_batch(
        self, prompts: Sequence[Sequence[int]], images: np.ndarray, padding_side: str,
        origins: np.ndarray | None = None,
    ) -> Batch:  # fmt: skip
        """Embed token-id ``prompts`` (each ``<bos>``, one run of ``grid * grid`` ``<image>`` ids, then text)
        with ``images`` ``(B, side, side, 3)`` in place of the ``<image>`` ids (``origins``: see
        :func:`vision_stem`)."""
        grid = images.shape[1] // world.PATCH
        vision_tokens = grid * grid
        batch = len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.full((batch, width), world.PAD, dtype=torch.long)
        mask = torch.zeros(batch, width, dtype=torch.bool)
        spans = []
        for b, prompt in enumerate(prompts):
            start = width - len(prompt) if padding_side == "left" else 0
            ids[b, start : start + len(prompt)] = torch.tensor(prompt)
            mask[b, start : start + len(prompt)] = True
            image_at = [i for i, t in enumerate(prompt) if t == world.IMAGE]
            if len(image_at) != vision_tokens or image_at[-1] - image_at[0] != vision_tokens - 1:
                raise ValueError(f"prompt {b} must hold one run of {vision_tokens} <image> tokens")
            spans.append([VisionSpan(start + image_at[0], start + image_at[0] + vision_tokens, grid, grid)])
        device = self.projector.weight.device
        embeds = self.decoder.model.embed_tokens(ids.to(device))
        vision = self.projector(vision_stem(images, origins).to(device))
        embeds = embeds.masked_scatter((ids == world.IMAGE).to(device)[..., None], vision)
        return Batch(embeds, mask.to(device), spans)

    @torch.no_grad()
    def answer(
        self, examples: Sequence[world.Example], questions: Sequence[world.Question],
        reduction: CompressionMethod | None = None,
    ) -> tuple[list[tuple[str, ...]], PrefillStats]:  # fmt: skip
        """Greedy answers to ``questions[i]`` about ``examples[i]``, and the prefill statistics."""
        return self.answer_images(np.stack([e.image for e in examples]), questions, reduction)

    @torch.no_grad()
    def answer_images(
        self, images: np.ndarray, questions: Sequence[world.Question], reduction: CompressionMethod | None = None
    ) -> tuple[list[tuple[str, ...]], PrefillStats]:
        """Greedy answers to ``questions[i]`` about ``images[i]`` (``(B, side, side, 3)`` float32 in [0, 1], as
        :func:`~lightkv_adapters.reference.shapes_world.render` draws them), and the prefill statistics."""
        prompts = [prompt_ids(q) for q in questions]
        batch = self.build_batch(prompts, images, padding_side="left")
        tokens, stats = self.decoder.generate(
            batch.embeds,
            attention_mask=batch.mask,
            spans=batch.spans,
            reduction=reduction,
            max_new_tokens=MAX_ANSWER_TOKENS,
            eos_token_id=world.EOS,
        )
        return [world.decode(row) for row in tokens.tolist()], stats


class WeightsError(ValueError):
    """A file :meth:`TinyLVLM.load` cannot use; the message names it, the problem and how to write good weights."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path} is not tiny-LVLM weights: {problem}; {_train_hint(path)}")


def _train_hint(path: Path) -> str:
    return f"retrain with `python -m lightkv_adapters.reference.train --out {path}`"


def _tensor_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """What differs between a model's state dict and a file's tensors ("" if nothing): the first missing,
    unexpected and differently shaped names, with counts."""

    def listed(names: list[str], what: str) -> str:
        more = f" and {len(names) - 1} more" if len(names) > 1 else ""
        return f"{what} {names[0]}{more}" if names else ""

    shapes = [
        f"{name} {tuple(found[name].shape)} instead of {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in found and found[name].shape != tensor.shape
    ]
    parts = [
        listed(sorted(set(expected) - set(found)), "missing"),
        listed(sorted(set(found) - set(expected)), "unexpected"),
        listed(shapes, "shape of"),
    ]
    return "; ".join(part for part in parts if part)


def load_weights_option(weights: str) -> TinyLVLM:
    """The model a command's ``--weights`` names (``""``: the shipped one); a file it cannot load is a usage error
    naming the file and what to do."""
    if not weights:
        return TinyLVLM.load()
    try:
        return TinyLVLM.load(weights)
    except (FileNotFoundError, WeightsError) as error:
        raise UsageError(f"--weights: {error}, or omit --weights for the shipped weights") from None


def prompt_ids(question: world.Question) -> list[int]:
    """``<bos> <image> x 256`` followed by the question's ids."""
    return [world.BOS] + [world.IMAGE] * VISION_TOKENS + world.encode(question.words)
