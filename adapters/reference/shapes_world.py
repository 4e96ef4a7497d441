"""A synthetic, deterministic visual-QA world: coloured shapes on textured backgrounds.

An image is ``GRID x GRID`` patches of ``PATCH x PATCH`` RGB pixels, cut into ``CELLS x CELLS`` cells of 4 x 4
patches, one object per cell. Everything is a pure function of an integer seed. The objects and the question types:
README, "The reference decoder and the tiny LVLM".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GRID = 16
PATCH = 4
CELLS = 4
CELL_PATCHES = GRID // CELLS
MIN_OBJECTS, MAX_OBJECTS = 3, 5

COLOURS = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.12, 0.78, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.12),
    "purple": (0.62, 0.20, 0.82),
    "cyan": (0.10, 0.85, 0.85),
}
SHAPES = ("square", "circle", "triangle", "cross")
SIZES = ("small", "medium", "large")
RELATIONS = {"left": (0, -1), "right": (0, 1), "above": (-1, 0), "below": (1, 0)}
QUESTION_TYPES = ("relation", "describe", "count", "size", "shape")
MAX_ANSWER_WORDS = 4  # "large blue cross ."
TEXTURES = ("stripes_h", "stripes_v", "checks", "noise")

_GLYPHS = {
    "square": ["####", "####", "####", "####"],
    "circle": [".##.", "####", "####", ".##."],
    "triangle": ["...#", "..##", ".###", "####"],
    "cross": [".#..", "####", ".#..", ".#.."],
}
GLYPHS = {name: np.array([[c == "#" for c in row] for row in rows]) for name, rows in _GLYPHS.items()}

SPECIAL = ("<pad>", "<bos>", "<image>", "?", ".")
WORDS = (
    "what", "colour", "size", "shape", "is", "the", "object", "of", "how", "many", "objects", "are", "there",
    "describe",
)  # fmt: skip
NUMBERS = tuple(str(n) for n in range(MAX_OBJECTS + 1))
VOCAB = SPECIAL + WORDS + tuple(COLOURS) + SHAPES + SIZES + tuple(RELATIONS) + NUMBERS
TOKEN_ID = {word: i for i, word in enumerate(VOCAB)}
PAD, BOS, IMAGE, EOS = TOKEN_ID["<pad>"], TOKEN_ID["<bos>"], TOKEN_ID["<image>"], TOKEN_ID["."]


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: int  # side in patches: 1, 2 or 3
    cell: tuple[int, int]  # (row, col) of its cell
    offset: tuple[int, int]  # (row, col) of its top-left patch inside the cell

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Question:
    kind: str
    words: tuple[str, ...]  # the question, ending with "?"
    answer: tuple[str, ...]  # the answer, ending with "."


@dataclass(frozen=True)
class Example:
    seed: int
    image: np.ndarray  # (side, side, 3) float32 in [0, 1]; side 64 on the full layout
    objects: tuple[SceneObject, ...]
    questions: tuple[Question, ...]  # several of every type (see _questions), in random order


def encode(words: tuple[str, ...] | list[str]) -> list[int]:
    """Token ids of ``words``; an unknown word is an error."""
    try:
        return [TOKEN_ID[w] for w in words]
    except KeyError as error:
        raise ValueError(f"word {error.args[0]!r} is not in the shapes-world vocabulary") from None


def decode(ids: list[int]) -> tuple[str, ...]:
    """Words of ``ids`` up to and including the first ``.``."""
    words = []
    for i in ids:
        words.append(VOCAB[i])
        if i == EOS:
            break
    return tuple(words)


def sample_scene(rng: np.random.Generator, cells: int = CELLS) -> tuple[SceneObject, ...]:
    """Objects on a ``cells x cells`` layout: 3-5 of them on the full 4 x 4 layout, fewer on smaller ones."""
    slots = cells * cells
    count = int(rng.integers(min(MIN_OBJECTS, slots - 2), min(MAX_OBJECTS, slots - 1) + 1))
    layout = cells
    cells = rng.choice(slots, size=count, replace=False)
    colours = rng.choice(len(COLOURS), size=count, replace=False)
    objects = []
    for cell, colour in zip(cells, colours, strict=True):
        size = int(rng.integers(1, 4))
        offset = (int(rng.integers(0, CELL_PATCHES - size + 1)), int(rng.integers(0, CELL_PATCHES - size + 1)))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        objects.append(SceneObject(tuple(COLOURS)[colour], shape, size, divmod(int(cell), layout), offset))
    return tuple(sorted(objects, key=lambda o: o.cell))


def render(objects: tuple[SceneObject, ...], rng: np.random.Generator, cells: int = CELLS) -> np.ndarray:
    """``(side, side, 3)`` float32 image, ``side = cells * CELL_PATCHES * PATCH`` (64 on the full layout)."""
    side = cells * CELL_PATCHES * PATCH
    base = rng.uniform(0.15, 0.40) + rng.uniform(-0.05, 0.05, size=3)
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    rows, cols = np.mgrid[0:side, 0:side]
    period = int(rng.integers(2, 6))
    if texture == "stripes_h":
        pattern = (rows // period) % 2
    elif texture == "stripes_v":
        pattern = (cols // period) % 2
    elif texture == "checks":
        pattern = ((rows // period) + (cols // period)) % 2
    else:
        pattern = rng.integers(0, 2, size=(side, side))
    image = base[None, None, :] + 0.08 * pattern[..., None] + rng.normal(0.0, 0.03, size=(side, side, 3))
    for obj in objects:
        colour = np.array(COLOURS[obj.colour]) + rng.uniform(-0.05, 0.05, size=3)
        top = (obj.cell[0] * CELL_PATCHES + obj.offset[0]) * PATCH
        left = (obj.cell[1] * CELL_PATCHES + obj.offset[1]) * PATCH
        tile = np.tile(GLYPHS[obj.shape], (obj.size, obj.size))
        region = image[top : top + obj.size * PATCH, left : left + obj.size * PATCH]
        region[tile] = colour
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _questions(objects: tuple[SceneObject, ...], rng: np.random.Generator) -> list[Question]:
    """Up to three relation questions and two of every other type, in random order."""
    by_cell = {o.cell: o for o in objects}
    questions = []

    pairs = [(o, rel, by_cell[(o.cell[0] + dr, o.cell[1] + dc)]) for o in objects for rel, (dr, dc) in
             RELATIONS.items() if (o.cell[0] + dr, o.cell[1] + dc) in by_cell]  # fmt: skip
    for index in rng.permutation(len(pairs))[:3]:
        anchor, relation, neighbour = pairs[index]
        words = ("what", "colour", "is", "the", "object", relation, "of", "the", anchor.colour, "object", "?")
        questions.append(Question("relation", words, (neighbour.colour, ".")))
    for index in rng.permutation(len(objects))[:2]:
        target = objects[index]
        answer = (SIZES[target.size - 1], target.colour, target.shape, ".")
        questions.append(Question("describe", ("describe", "the", target.colour, "object", "?"), answer))

    for _ in range(2):
        present = sorted({o.shape for o in objects})
        pool = present if rng.random() < 0.8 else SHAPES
        shape = pool[int(rng.integers(len(pool)))]
        count = sum(o.shape == shape for o in objects)
        questions.append(Question("count", ("how", "many", shape, "objects", "are", "there", "?"), (str(count), ".")))

    for index in rng.permutation(len(objects))[:2]:
        target = objects[index]
        questions.append(Question("size", ("what", "size", "is", "the", target.colour, "object", "?"),
                                  (SIZES[target.size - 1], ".")))  # fmt: skip
    for index in rng.permutation(len(objects))[:2]:
        target = objects[index]
        questions.append(Question("shape", ("what", "shape", "is", "the", target.colour, "object", "?"),
                                  (target.shape, ".")))  # fmt: skip
    order = rng.permutation(len(questions))
    return [questions[i] for i in order]


def make_example(seed: int, cells: int = CELLS) -> Example:
    """The example of integer ``seed`` (scene, image and questions). Held-out sets use the full
    ``CELLS x CELLS`` layout; training also starts on smaller ones (``cells`` >= 2), a curriculum."""
    if not 2 <= cells <= CELLS:
        raise ValueError(f"cells must be in [2, {CELLS}], got {cells}")
    rng = np.random.default_rng(seed)
    objects = sample_scene(rng, cells)
    image = render(objects, rng, cells)
    return Example(seed, image, objects, tuple(_questions(objects, rng)))


def patchify(images: np.ndarray) -> np.ndarray:
    """``(N, side, side, 3)`` images to ``(N, grid * grid, PATCH * PATCH * 3)`` patch pixels in raster order,
    ``grid = side // PATCH``."""
    n, side = images.shape[0], images.shape[1]
    grid = side // PATCH
    patches = images.reshape(n, grid, PATCH, grid, PATCH, 3).transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(n, grid * grid, PATCH * PATCH * 3)
