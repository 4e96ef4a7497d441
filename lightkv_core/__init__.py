"""lightkv_core: framework-agnostic LightKV vision-token compression (Triton kernels + PyTorch fallbacks).

Public API (``__all__``; README, "Use", "Methods" and "Kernels"):
    lightkv_stage, plan_stage, StagePlan, StageResult, VisionSpan, num_merged: one stage, its plan and its result
    LightKVConfig, PRESETS, PRESET_DEPTHS: schedules and the released presets
    METHODS, method_by_name, drop_tokens, PrefillStats: methods by name, the drop methods' compaction, KV accounting
    plan_lengths, LengthPlan: KV tokens per layer group before the forward (for a scheduler)
    cross_attention_scores, window_best_match, merge_compact, attention_statistics: the kernels (``backend=``)
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
