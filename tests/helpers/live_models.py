"""The tiny models the live SGLang servers serve (tests/live/), saved to disk with everything their processors need
to load offline: a byte-level tokenizer whose special tokens sit at :mod:`helpers.hf_models`' ids, a chat template
and the image processor's configuration.

- ``qwen2.5-vl``: :func:`helpers.hf_models.build` with the released vision patch (14 pixels) and Qwen's special
  tokens; Transformers' ``Qwen2VLImageProcessor`` with at most :data:`QWEN_MAX_TOKENS` image tokens per image.
- ``llava``: with a ``CLIPImageProcessor`` of the tower's 48-pixel input (144 image tokens per image) and a LLaVA
  ``USER: <image>\\n... ASSISTANT:`` template; saved in the LLaVA-1.5 layout SGLang serves
  (``LlavaLlamaForCausalLM``, :func:`hf_models.save_original_llava`), or with ``layout="transformers"`` as
  Transformers saves ``LlavaForConditionalGeneration`` (what ``AutoModelForImageTextToText`` loads).

:func:`save` writes one; :func:`load_transformers` gives back the Transformers model on the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from helpers import hf_models

#: The families a live SGLang server serves.
FAMILIES = ("qwen2.5-vl", "llava")
#: The families saved for Transformers (``layout="transformers"``): every one ``apply_lightkv`` supports.
TRANSFORMERS_FAMILIES = ("qwen2.5-vl", "qwen2-vl", "llava", "llava-next")
#: Byte-level tokens (256) plus the specials, with room: the vocabulary of every model.
VOCAB_SIZE = 264
#: Weight seed of each family (LLaVA seed 2 decodes varied tokens, see tests/adapters/test_sglang_models.py).
SEEDS = {"qwen2.5-vl": 0, "qwen2-vl": 0, "llava": 2, "llava-next": 2}
#: The tokenizer, chat template and image tokens each family shares with its older sibling.
TOKENS_OF = {"qwen2.5-vl": "qwen2.5-vl", "qwen2-vl": "qwen2.5-vl", "llava": "llava", "llava-next": "llava"}
QWEN_PATCH = 14
#: Most merged (28x28-pixel) tokens of one Qwen image; images are resized to fit.
QWEN_MAX_TOKENS = 128
QWEN_MIN_TOKENS = 4
#: Special tokens -> ids, per family (image and padding ids are the models' own, from hf_models).
SPECIALS = {
    "qwen2.5-vl": {
        "<|endoftext|>": hf_models.PAD,
        "<|image_pad|>": hf_models.IMAGE,
        "<|video_pad|>": hf_models.VIDEO,
        "<|vision_start|>": hf_models.VISION_START,
        "<|vision_end|>": hf_models.VISION_END,
        "<|im_start|>": 154,
        "<|im_end|>": 155,
    },
    "llava": {"<unk>": hf_models.PAD, "<image>": hf_models.IMAGE, "<s>": 154, "</s>": 155},
}
EOS = {"qwen2.5-vl": "<|im_end|>", "llava": "</s>"}

QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}<image>\n"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def save(family: str, directory: Path, layout: str = "sglang") -> Path:
    """Build ``family``'s tiny model and save it, its tokenizer and its processor configuration in ``directory``
    (``layout``: ``"sglang"`` or ``"transformers"``, which differ for LLaVA only)."""
    if family not in TRANSFORMERS_FAMILIES or (layout == "sglang" and family not in FAMILIES):
        known = FAMILIES if layout == "sglang" else TRANSFORMERS_FAMILIES
        raise ValueError(f"unknown family {family!r} for layout {layout!r}; known: {known}")
    if layout not in ("sglang", "transformers"):
        raise ValueError(f"unknown layout {layout!r}; known: sglang, transformers")
    directory.mkdir(parents=True, exist_ok=True)
    model = _build(family)
    _save_tokenizer(TOKENS_OF[family], directory)
    if family == "llava" and layout == "sglang":
        hf_models.save_original_llava(model, directory)
    else:
        model.save_pretrained(directory)
    if TOKENS_OF[family] == "qwen2.5-vl":
        _save_qwen_processor(directory, "Qwen2_5_VLProcessor" if family == "qwen2.5-vl" else "Qwen2VLProcessor")
    else:
        _save_llava_processor(model, directory)
    model.generation_config.save_pretrained(directory)
    info = {"family": family, "seed": SEEDS[family], "layout": layout}
    (directory / "lightkv-family.json").write_text(json.dumps(info))
    return directory


def load_transformers(directory: Path) -> torch.nn.Module:
    """The Transformers model (eval, float32) on the weights :func:`save` wrote in ``directory``."""
    return _build(json.loads((Path(directory) / "lightkv-family.json").read_text())["family"])


def _build(family: str) -> torch.nn.Module:
    model = hf_models.build(family, seed=SEEDS[family], qwen_patch=QWEN_PATCH, vocab_size=VOCAB_SIZE)
    eos = SPECIALS[TOKENS_OF[family]][EOS[TOKENS_OF[family]]]
    for config in (model.config, model.config.text_config, model.generation_config):
        config.eos_token_id = eos
        config.bos_token_id = None
    model.generation_config.pad_token_id = hf_models.PAD
    return model


def _save_tokenizer(family: str, directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import ByteLevel
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[family]
    taken = set(specials.values())
    free = (index for index in range(VOCAB_SIZE) if index not in taken)
    vocab = {char: next(free) for char in sorted(pre_tokenizers.ByteLevel.alphabet())}
    vocab.update(specials)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    core.post_processor = ByteLevel(trim_offsets=False)
    core.add_special_tokens(list(specials))
    pad = hf_models.PAD
    pad_token = next(token for token, index in specials.items() if index == pad)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS[family],
        pad_token=pad_token,
        additional_special_tokens=[token for token in specials if token not in (EOS[family], pad_token)],
        model_max_length=4096,
    )
    tokenizer.chat_template = QWEN_TEMPLATE if family == "qwen2.5-vl" else LLAVA_TEMPLATE
    tokenizer.save_pretrained(directory)
    if family == "qwen2.5-vl":  # the class Qwen2.5-VL's processor expects; tokenizers-backed in Transformers 5
        path = directory / "tokenizer_config.json"
        config = json.loads(path.read_text())
        config["tokenizer_class"] = "Qwen2Tokenizer"
        path.write_text(json.dumps(config, indent=2))


def _save_qwen_processor(directory: Path, processor_class: str) -> None:
    side = 2 * QWEN_PATCH  # one merged token
    image = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": processor_class,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "rescale_factor": 1 / 255,
        "patch_size": QWEN_PATCH,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "min_pixels": QWEN_MIN_TOKENS * side * side,
        "max_pixels": QWEN_MAX_TOKENS * side * side,
        "size": {"shortest_edge": QWEN_MIN_TOKENS * side * side, "longest_edge": QWEN_MAX_TOKENS * side * side},
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    video = {key: value for key, value in image.items() if key != "image_processor_type"}
    video["video_processor_type"] = "Qwen2VLVideoProcessor"
    (directory / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    (directory / "processor_config.json").write_text(json.dumps({"processor_class": processor_class}))


def _save_llava_processor(model: torch.nn.Module, directory: Path) -> None:
    """LLaVA-1.5 (``LlavaProcessor``, ``CLIPImageProcessor``) or LLaVA-NeXT (``LlavaNextProcessor``,
    ``LlavaNextImageProcessor`` with the model's tile pinpoints)."""
    next_tiles = getattr(model.config, "image_grid_pinpoints", None)
    processor_class = "LlavaNextProcessor" if next_tiles else "LlavaProcessor"
    side = model.config.vision_config.image_size
    image = {
        "image_processor_type": "LlavaNextImageProcessor" if next_tiles else "CLIPImageProcessor",
        "processor_class": processor_class,
        "do_resize": True,
        "size": {"shortest_edge": side},
        "do_center_crop": True,
        "crop_size": {"height": side, "width": side},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
        "resample": 3,
    }
    if next_tiles:
        image.update(do_pad=True, image_grid_pinpoints=next_tiles)
    (directory / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    tower = directory / "clip-vision"
    if tower.is_dir():  # the SGLang layout's tower folder
        (tower / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    processor = {
        "processor_class": processor_class,
        "patch_size": model.config.vision_config.patch_size,
        "vision_feature_select_strategy": model.config.vision_feature_select_strategy,
        "num_additional_image_tokens": 1,
        "image_token": "<image>",
    }
    (directory / "processor_config.json").write_text(json.dumps(processor, indent=2))
