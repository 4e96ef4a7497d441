"""Transformers adapter: ``apply_lightkv(model)`` on stock LLaVA, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL.

    from lightkv_adapters.hf import apply_lightkv
    apply_lightkv(model)                       # the released schedule of the model's family, scaled to its depth
    output = model.generate(**inputs)          # unchanged API; model.lightkv_stats describes the prefill

``with lightkv(model, config): ...`` applies it for a block; ``remove_lightkv(model)`` undoes it.
"""

from lightkv_adapters.hf.apply import apply_lightkv, lightkv, remove_lightkv

__all__ = ["apply_lightkv", "lightkv", "remove_lightkv"]
