"""The LightKV kernels (scoring, window matching, merge + compaction) and the attention statistics of the
dropping baselines, each a Triton kernel with a plain-PyTorch fallback next to it."""

from lightkv_core.kernels.attention_stats import attention_statistics
from lightkv_core.kernels.merge_compact import merge_compact
from lightkv_core.kernels.scoring import cross_attention_scores
from lightkv_core.kernels.window_match import window_best_match

__all__ = ["attention_statistics", "cross_attention_scores", "merge_compact", "window_best_match"]
