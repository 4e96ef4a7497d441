"""An lmms-eval task the tests write to disk: held-out questions of the shapes world (the tiny LVLM's data), with
exact-match answers, loadable offline (``--include_path`` the folder).

Each row of ``data.jsonl`` holds the question words, the answer words, the question type and the image: a ``.npy``
file of the float32 render (what ``lightkv eval`` feeds the tiny LVLM, bit for bit) or, for Transformers models, a
PNG of it scaled up ``png_scale`` times (so that a Qwen-VL processor gives a real token grid).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

UTILS = """
import numpy as np
from PIL import Image


def doc_to_visual(doc):
    path = doc["image"]
    return [np.load(path)] if path.endswith(".npy") else [Image.open(path).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
"""

TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_shapes_task(
    folder: Path, pairs: list, name: str, image_format: str = "npy", png_scale: int = 4, max_new_tokens: int = 4
) -> Path:
    """Write the task ``name`` over ``pairs`` (``(world.Example, world.Question)``) into ``folder``; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    images = folder / "images"
    images.mkdir(exist_ok=True)
    rows = []
    for index, (example, question) in enumerate(pairs):
        if image_format == "npy":
            path = images / f"{index}.npy"
            np.save(path, example.image)
        else:
            path = images / f"{index}.png"
            pixels = np.clip(example.image * 255 + 0.5, 0, 255).astype(np.uint8)
            side = pixels.shape[0] * png_scale
            Image.fromarray(pixels).resize((side, side), Image.NEAREST).save(path)
        rows.append(
            {
                "id": index,
                "kind": question.kind,
                "question": " ".join(question.words),
                "answer": " ".join(question.answer),
                "image": str(path),
            }
        )
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "utils.py").write_text(UTILS)
    (folder / f"{name}.yaml").write_text(TASK.format(name=name, data=data, max_new_tokens=max_new_tokens))
    return folder
