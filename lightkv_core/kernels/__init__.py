"""The three LightKV kernels, each a Triton kernel with a plain-PyTorch fallback next to it."""

from lightkv_core.kernels.merge_compact import merge_compact
from lightkv_core.kernels.scoring import cross_attention_scores
from lightkv_core.kernels.window_match import window_best_match

__all__ = ["cross_attention_scores", "merge_compact", "window_best_match"]
