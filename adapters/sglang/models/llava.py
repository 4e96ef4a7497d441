"""LLaVA on Qwen2 and Llama text models with ``--kv-compress``."""

from sglang.srt.models.llava import LlavaLlamaForCausalLM as _StockLlavaLlama
from sglang.srt.models.llava import LlavaQwenForCausalLM as _StockLlavaQwen


class LlavaLlamaForCausalLM(_StockLlavaLlama):
    """SGLang's LLaVA on Llama; compresses vision tokens in prefill when ``--kv-compress`` asks for it."""


class LlavaQwenForCausalLM(_StockLlavaQwen):
    """SGLang's LLaVA on Qwen2; compresses vision tokens in prefill when ``--kv-compress`` asks for it."""


EntryClass = [LlavaLlamaForCausalLM, LlavaQwenForCausalLM]
