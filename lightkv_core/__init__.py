"""lightkv_core: framework-agnostic LightKV vision-token compression (Triton kernels + PyTorch fallbacks).

Public API:
    lightkv_stage        one compression stage on a layer's output (see :mod:`lightkv_core.stage`)
    plan_stage, StagePlan
                         a stage's checked inputs and the arguments of its kernels (for tuning and benchmarks)
    drop_tokens          keep only marked tokens (the compaction step of the dropping methods)
    StageResult          what a stage returns
    VisionSpan           an image's tokens in the sequence, with its grid
    PrefillStats         per-layer KV accounting of a prefill, shared by every adapter
    LightKVConfig        a schedule (merge_layers / merge_windows / merge_ratios), with PRESETS
    plan_lengths, LengthPlan
                         tokens one request holds in each layer group, from its spans alone (for a scheduler)
    cross_attention_scores, window_best_match, merge_compact
                         the three LightKV kernels, each with ``backend="auto"|"triton"|"torch"``
    attention_statistics attention selected keys receive from selected queries (the statistics of
                         FastV, PrefixKV, AirCache, LOOK-M), streamed, with the same ``backend`` choice
    METHODS, method_by_name
                         every compression method by name (see :mod:`lightkv_core.methods`)
"""

from lightkv_core.compaction import StageResult, drop_tokens
from lightkv_core.config import PRESET_DEPTHS, PRESETS, LightKVConfig
from lightkv_core.kernels import attention_statistics, cross_attention_scores, merge_compact, window_best_match
from lightkv_core.methods import METHODS, method_by_name
from lightkv_core.plan import LengthPlan, plan_lengths
from lightkv_core.spans import VisionSpan
from lightkv_core.stage import StagePlan, lightkv_stage, plan_stage
from lightkv_core.stats import PrefillStats
from lightkv_core.windows import num_merged

__all__ = [
    "METHODS",
    "PRESETS",
    "PRESET_DEPTHS",
    "LengthPlan",
    "LightKVConfig",
    "PrefillStats",
    "StagePlan",
    "StageResult",
    "VisionSpan",
    "attention_statistics",
    "cross_attention_scores",
    "drop_tokens",
    "lightkv_stage",
    "method_by_name",
    "merge_compact",
    "num_merged",
    "plan_lengths",
    "plan_stage",
    "window_best_match",
]
