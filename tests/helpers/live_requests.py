"""What the live suite sends: images as base64 PNGs, OpenAI chat requests, and the prompts' ``/generate`` form.

Images are seeded noise (every patch differs, so merges and drops have real choices) at sizes the model's image
processor keeps as they are: Qwen2.5-VL sides are multiples of 28 pixels (one merged token each, within the
processor's pixel budget), LLaVA images are the tower's 48-pixel square.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image


def png(width: int, height: int, seed: int) -> str:
    """A ``data:`` URL of a ``width`` x ``height`` RGB PNG of seeded noise."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass(frozen=True)
class Prompt:
    """A user message: its images (``(width, height, seed)`` each) before its text, and the answer length."""

    text: str
    images: tuple[tuple[int, int, int], ...] = ()
    max_tokens: int = 6
    extra: dict = field(default_factory=dict)

    def messages(self) -> list[dict]:
        parts = [{"type": "image_url", "image_url": {"url": png(*image)}} for image in self.images]
        if len(parts) > 1:  # else SGLang's LLaVA processor reads the first image only
            parts = [dict(part, modalities="multi-images") for part in parts]
        return [{"role": "user", "content": [*parts, {"type": "text", "text": self.text}]}]

    def chat(self, **fields: object) -> dict:
        """The ``/v1/chat/completions`` body, greedy, with ``fields`` on top."""
        body = {"model": "default", "messages": self.messages(), "max_tokens": self.max_tokens, "temperature": 0}
        body.update(self.extra)
        body.update(fields)
        return body

    def generate(self, tokenizer: object, **fields: object) -> dict:
        """The ``/generate`` body: the chat template's text with the images as ``image_data``, greedy."""
        text = tokenizer.apply_chat_template(self.messages(), add_generation_prompt=True, tokenize=False)
        body = {
            "text": text,
            "sampling_params": {"max_new_tokens": self.max_tokens, "temperature": 0},
        }
        if self.images:
            body["image_data"] = [png(*image) for image in self.images]
        if len(self.images) > 1:  # else SGLang's LLaVA processor reads the first image only
            body["modalities"] = ["multi-images"]
        body.update(fields)
        return body

    def reference_request(self) -> dict:
        """What ``tests/live/hf_reference.py`` reads."""
        return {"messages": self.messages(), "max_tokens": self.max_tokens}


#: The requests answered by both the servers and the Transformers adapter, per family: one image, two images of
#: different sizes, text only. Qwen grids (merged tokens): 8x10, 8x8 and 10x12; every LightKV stage merges.
CORRECTNESS_PROMPTS = {
    "qwen2.5-vl": (
        Prompt("What is in this image?", ((280, 224, 1),)),
        Prompt("Compare the two pictures.", ((224, 224, 2), (336, 280, 3))),
        Prompt("Write one word about the sea.", ()),
    ),
    "llava": (
        Prompt("What is in this image?", ((48, 48, 1),)),
        Prompt("Compare the two pictures.", ((48, 48, 2), (48, 48, 3))),
        Prompt("Write one word about the sea.", ()),
    ),
}
