"""What the Transformers adapter answers to the live suite's chat requests: the reference of the live servers.

    python tests/live/hf_reference.py MODEL_DIR METHOD REQUESTS_JSON OUT_JSON

Runs in a process with the live servers' environment (``helpers.live_server.live_env``), so the image processor is
the one the server loads, from the same folder. ``REQUESTS_JSON`` lists OpenAI chat requests (``messages`` with
base64 PNG ``image_url`` parts, ``max_tokens``); for each, the chat template and processor make the prompt as the
server does, the model saved in ``MODEL_DIR`` decodes greedily (with ``apply_lightkv(model, METHOD)`` unless METHOD
is ``none``), and ``OUT_JSON`` gets ``{"tokens", "logprobs", "prompt_tokens", "vision_retention"}`` per request: the
generated token ids, the log-probability of each (float32 log-softmax of the logits), the prompt length and the
adapter's measured vision retention (``None`` under ``none``).

LLaVA saved for SGLang: SGLang's LLaVA-1.5 processor pads each image to a square (``expand2square``, the
processor's mean colour) and hands the pixels over in float16; the same is done here, so both sides see the same
pixels. A checkpoint saved for Transformers gets the processor's own pixels.
"""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from helpers import live_models  # noqa: E402


def _images(messages: list[dict]) -> list[Image.Image]:
    images = []
    for message in messages:
        content = message["content"]
        for part in content if isinstance(content, list) else []:
            if part.get("type") == "image_url":
                data = part["image_url"]["url"].split(",", 1)[1]
                images.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
    return images


def _square(image: Image.Image, colour: tuple[int, ...]) -> Image.Image:
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), colour)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _inputs(processor, as_sglang_llava: bool, request: dict) -> dict:
    text = processor.apply_chat_template(request["messages"], add_generation_prompt=True, tokenize=False)
    images = _images(request["messages"])
    if as_sglang_llava and images:
        colour = tuple(int(mean * 255) for mean in processor.image_processor.image_mean)
        images = [_square(image, colour) for image in images]
    inputs = processor(text=[text], images=images or None, return_tensors="pt")
    if as_sglang_llava and images:
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.float16).to(torch.float32)
    return dict(inputs)


def main(model_dir: str, method: str, requests_path: str, out_path: str) -> None:
    from transformers import AutoProcessor

    from lightkv_adapters.hf import apply_lightkv

    torch.set_num_threads(1)
    info = json.loads((Path(model_dir) / "lightkv-family.json").read_text())
    as_sglang_llava = info["family"] == "llava" and info.get("layout", "sglang") == "sglang"
    processor = AutoProcessor.from_pretrained(model_dir)
    model = live_models.load_transformers(Path(model_dir))
    if method != "none":
        apply_lightkv(model, method)
    answers = []
    for request in json.loads(Path(requests_path).read_text()):
        inputs = _inputs(processor, as_sglang_llava, request)
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=request["max_tokens"],
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
        prompt = inputs["input_ids"].shape[1]
        tokens = out.sequences[0, prompt:].tolist()
        logprobs = [
            float(torch.log_softmax(logits[0].float(), dim=-1)[token])
            for logits, token in zip(out.logits, tokens, strict=True)
        ]
        retention = None if method == "none" else float(model.lightkv_stats.vision_retention()[0])
        answers.append({"tokens": tokens, "logprobs": logprobs, "prompt_tokens": prompt, "vision_retention": retention})
    Path(out_path).write_text(json.dumps(answers))


if __name__ == "__main__":
    main(*sys.argv[1:])
