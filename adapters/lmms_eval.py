"""The lmms-eval model ``lightkv``: any lightkv method on any supported checkpoint, evaluated by lmms-eval 0.7.x.

    pip install "lightkv[eval]"
    lmms-eval --model lightkv --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=lightkv,preset=llava-1.5 \\
        --tasks mme --batch_size 8 --output_path results/

The model is registered through lmms-eval's entry-point group ``lmms_eval.models`` (:func:`manifests`), so the
installed package is all lmms-eval needs. Requests run in batches of lmms-eval's ``--batch_size``. ``--model_args``:

* ``pretrained``: a Transformers checkpoint (folder or hub id) of a family :func:`lightkv_adapters.hf.apply_lightkv`
  supports (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL), or ``lightkv-tiny`` for the tiny LVLM this project ships
  (run through the reference decoder: it is not a Transformers model, see the README).
* ``method``: ``none`` or a name of ``lightkv_core.METHODS`` (``lightkv``, ``fastv``, ``prefixkv``, ...);
  ``preset`` (LightKV's released schedule, default the model family's) and ``retention`` (the budget of FastV and the
  eviction methods; on ``lightkv-tiny`` every method, set as ``lightkv eval`` sets it) as
  :func:`lightkv_core.methods.method_by_name` takes them.
* ``dtype`` (``float32``, ``bfloat16``, ``float16``; default ``bfloat16`` on a GPU, else ``float32``), ``device``,
  ``max_new_tokens`` (default 128, a task's own wins).
* ``stats_out``: the JSON-lines file that gets one line per answered request (task, doc id, vision retention,
  KV tokens, prefill seconds of its batch). Default: ``lmms-eval-lightkv-<time>.jsonl`` in the results folder
  (``$LIGHTKV_RESULTS_DIR``, else ``~/.cache/lightkv/results``); its path is logged.

Under ``method=none`` a Transformers model still runs through the adapter at merge ratio 0, which changes nothing
(bit-identical to stock) but measures the same statistics.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger

from lightkv_core.methods import METHODS, method_by_name
from lightkv_core.run_record import output_file
from lightkv_core.stats import PrefillStats

#: The name lmms-eval knows this model by (``--model lightkv``).
MODEL_ID = "lightkv"
#: ``pretrained`` value of the shipped tiny LVLM.
TINY = "lightkv-tiny"
DEFAULT_MAX_NEW_TOKENS = 128
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def manifests() -> list:
    """Entry point of the group ``lmms_eval.models`` (pyproject.toml): registers ``--model lightkv``. lmms-eval
    calls it while its model registry initialises, so the registry's module is imported here, not at the top (a
    process that imports this module first would otherwise re-enter that initialisation)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.LightKVModel")]


class LightKVModel(lmms):
    """lmms-eval's ``generate_until`` for a lightkv-compressed model; see the module docstring for the arguments.

    Raises:
        ValueError naming the argument for an unknown method, model argument, dtype or a bad number.
    """

    def __init__(
        self,
        pretrained: str,
        method: str = "none",
        preset: str | None = None,
        retention: float | str | None = None,
        dtype: str | None = None,
        device: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS,
        stats_out: str | None = None,
        **unknown: object,
    ) -> None:
        super().__init__()
        unknown.pop("max_batch_size", None)  # lmms-eval's --max_batch_size: batches here are --batch_size
        if unknown:
            raise ValueError(f"lightkv model: unknown --model_args {sorted(unknown)}; see lightkv_adapters.lmms_eval")
        if method != "none" and method not in METHODS:
            raise ValueError(f"lightkv model: method={method!r} is not 'none' or one of {', '.join(METHODS)}")
        self.method_name = method
        self.preset = preset
        self.retention = None if retention in (None, "") else _number("retention", retention, float, least=0.0)
        if self.retention is not None and self.retention > 1.0:
            raise ValueError(f"lightkv model: retention={retention!r} must lie in [0, 1]")
        self.batch_size_per_gpu = _number("batch_size", batch_size, int, least=1)
        self.max_new_tokens = _number("max_new_tokens", max_new_tokens, int, least=1)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        if dtype not in DTYPES:
            raise ValueError(f"lightkv model: dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        default_name = f"lmms-eval-lightkv-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        self.stats_path = output_file(stats_out or None, default_name, option="stats_out=")
        self.stats_path.write_text("")
        logger.info(f"lightkv: per-request KV retention and prefill time go to {self.stats_path}")
        self.runner = _TinyRunner(self) if pretrained == TINY else _TransformersRunner(self, pretrained, DTYPES[dtype])

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in request order, computed in batches of ``batch_size`` requests with equal generation settings."""
        answers: list[str | None] = [None] * len(requests)
        for indices in _batches(requests, self.batch_size_per_gpu):
            chunk = [requests[i] for i in indices]
            visuals = [self._visuals(request) for request in chunk]
            contexts = [request.args[0] for request in chunk]
            settings = dict(chunk[0].args[1])
            texts, stats = self.runner.generate(contexts, visuals, settings)
            texts = [_cut_at_stops(text, settings.get("until")) for text in texts]
            self._record(chunk, stats)
            for index, text in zip(indices, texts, strict=True):
                answers[index] = text
                self.cache_hook.add_partial("generate_until", (requests[index].args[0], settings), text)
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("lightkv model: loglikelihood tasks are not supported, only generate_until tasks")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("lightkv model: multi-round tasks are not supported, only generate_until tasks")

    def _visuals(self, request: Instance) -> list:
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if visuals is None:
            return []
        return list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]

    def _record(self, chunk: Sequence[Instance], stats: PrefillStats) -> None:
        retention = stats.vision_retention().tolist()
        kv_tokens = stats.kv_tokens.sum(dim=0).tolist()
        with self.stats_path.open("a") as out:
            for b, request in enumerate(chunk):
                _, _, _, doc_id, task, split = request.args
                line = {
                    "task": task,
                    "split": split,
                    "doc_id": doc_id,
                    "method": self.method_name,
                    "vision_retention": None if np.isnan(retention[b]) else retention[b],
                    "kv_tokens": int(kv_tokens[b]),
                    "vision_tokens": int(stats.original_vision_tokens[b]),
                    "prefill_seconds": stats.prefill_seconds,
                    "batch_size": len(chunk),
                }
                out.write(json.dumps(line) + "\n")


class _TransformersRunner:
    """A Transformers checkpoint with :func:`~lightkv_adapters.hf.apply_lightkv` applied."""

    def __init__(self, owner: LightKVModel, pretrained: str, dtype: torch.dtype) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from lightkv_adapters.hf import apply_lightkv
        from lightkv_core.config import PRESET_DEPTHS, PRESETS

        self.processor = AutoProcessor.from_pretrained(pretrained)
        self.processor.tokenizer.padding_side = "left"
        model = AutoModelForImageTextToText.from_pretrained(pretrained, dtype=dtype, attn_implementation="sdpa")
        self.model = model.to(owner.device).eval()
        layers = self.model.model.language_model.config.num_hidden_layers
        name, preset = owner.method_name, owner.preset
        if name == "none":  # measured, nothing merged: merge ratio 0 is stock bit for bit
            released = PRESETS["llava-1.5"].scaled_to(layers, PRESET_DEPTHS["llava-1.5"])
            apply_lightkv(self.model, replace(released, merge_ratios=(0.0,) * len(released.merge_layers)))
        elif name == "lightkv" and preset is None and owner.retention is None:
            apply_lightkv(self.model)  # the released schedule of the model's family
        else:
            method = method_by_name(name, layers, preset=preset or "llava-1.5", retention=owner.retention)
            apply_lightkv(self.model, method)
        self.max_new_tokens = owner.max_new_tokens

    def generate(self, contexts: list[str], visuals: list[list], settings: dict) -> tuple[list[str], PrefillStats]:
        texts, images = [], []
        for context, pictures in zip(contexts, visuals, strict=True):
            content = [{"type": "image"} for _ in pictures] + [{"type": "text", "text": context}]
            messages = [{"role": "user", "content": content}]
            texts.append(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
            images.extend(_as_pil(picture) for picture in pictures)
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        inputs = inputs.to(self.model.device)
        sample = bool(settings.get("do_sample", False)) or float(settings.get("temperature", 0) or 0) > 0
        options = dict(
            max_new_tokens=int(settings.get("max_new_tokens", self.max_new_tokens)),
            do_sample=sample,
            num_beams=int(settings.get("num_beams", 1)),
        )
        if sample:
            options.update(temperature=float(settings.get("temperature", 1.0)), top_p=settings.get("top_p"))
        with torch.no_grad():
            out = self.model.generate(**inputs, **options)
        new = out[:, inputs["input_ids"].shape[1] :]
        return self.processor.batch_decode(new, skip_special_tokens=True), self.model.lightkv_stats


class _TinyRunner:
    """The shipped tiny LVLM through the reference decoder: the model and methods of ``lightkv eval``."""

    def __init__(self, owner: LightKVModel) -> None:
        from lightkv_adapters.reference import quality
        from lightkv_adapters.reference import shapes_world as world
        from lightkv_adapters.reference.tiny_lvlm import TinyLVLM

        self.world = world
        self.model = TinyLVLM.load().to(owner.device)
        layers = self.model.config.num_layers
        name = owner.method_name
        if name == "none":
            self.reduction = None
        elif owner.retention is not None:  # as `lightkv eval` sets a method to a retention target
            self.reduction = quality.build_method(name, layers, owner.retention, (world.GRID, world.GRID))
            if self.reduction is None:
                raise ValueError(f"lightkv model: {name} cannot reach retention={owner.retention} on lightkv-tiny")
        else:
            self.reduction = method_by_name(name, layers, preset=owner.preset or "llava-1.5")

    def generate(self, contexts: list[str], visuals: list[list], settings: dict) -> tuple[list[str], PrefillStats]:
        world = self.world
        if any(len(pictures) != 1 for pictures in visuals):
            raise ValueError("lightkv-tiny answers about exactly one image per request")
        images = np.stack([_as_array(pictures[0]) for pictures in visuals])
        questions = [world.Question("", tuple(context.split()), ()) for context in contexts]
        answers, stats = self.model.answer_images(images, questions, self.reduction)
        return [" ".join(words) for words in answers], stats


def _batches(requests: Sequence[Instance], size: int) -> Iterable[list[int]]:
    """Indices of consecutive requests, at most ``size`` per batch, with the same generation settings."""
    batch: list[int] = []
    for index, request in enumerate(requests):
        if batch and (len(batch) == size or request.args[1] != requests[batch[0]].args[1]):
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


def _cut_at_stops(text: str, until: object) -> str:
    stops = [until] if isinstance(until, str) else list(until or [])
    cut = min((text.index(stop) for stop in stops if stop and stop in text), default=len(text))
    return text[:cut]


def _as_pil(picture: object):
    from PIL import Image

    if isinstance(picture, Image.Image):
        return picture.convert("RGB")
    if isinstance(picture, (str, Path)):
        return Image.open(picture).convert("RGB")
    if isinstance(picture, np.ndarray):
        array = picture if picture.dtype == np.uint8 else np.clip(picture * 255 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    raise ValueError(f"lightkv model: a visual must be a PIL image, a path or an array, got {type(picture).__name__}")


def _as_array(picture: object) -> np.ndarray:
    """``(side, side, 3)`` float32 in [0, 1]: an array as given, an image or a ``.npy``/image path read."""
    if isinstance(picture, (str, Path)) and str(picture).endswith(".npy"):
        picture = np.load(picture)
    if isinstance(picture, np.ndarray):
        array = picture.astype(np.float32) / 255 if picture.dtype == np.uint8 else picture.astype(np.float32)
    else:
        array = np.asarray(_as_pil(picture), dtype=np.float32) / 255
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] != array.shape[1]:
        raise ValueError(f"lightkv-tiny needs a square RGB image, got an array of shape {array.shape}")
    return array


def _number(name: str, value: object, kind: type, least: float | None = None):
    """``value`` (lmms-eval hands numbers over as numbers or strings) as ``kind``, checked."""
    if isinstance(value, bool):
        raise ValueError(f"lightkv model: {name}={value!r} is not a number")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"lightkv model: {name}={value!r} is not a{'n integer' if kind is int else ' number'}"
        ) from None
    if kind is int and float(value) != number:
        raise ValueError(f"lightkv model: {name}={value!r} is not an integer")
    if least is not None and number < least:
        raise ValueError(f"lightkv model: {name}={value!r} must be at least {least}")
    return number
