"""Unguided merging (ablation): LightKV's windows and bipartite pairs with every merge weight equal."""

from __future__ import annotations

from dataclasses import dataclass, replace

from lightkv_core.methods.lightkv import LightKV


@dataclass(frozen=True)
class UnguidedMerge(LightKV):
    """LightKV with ``guide="none"``: no prompt scoring, a merged token is the plain mean of its group
    (windowed bipartite averaging). Any ``guide`` in ``config`` is replaced."""

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "config", replace(self.config, guide="none"))
