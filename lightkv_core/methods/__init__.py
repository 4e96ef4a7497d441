"""Compression methods on one interface (:class:`PrefillReduction`), one file each."""

from lightkv_core.methods.base import PrefillReduction
from lightkv_core.methods.fastv import FastV, attention_received
from lightkv_core.methods.lightkv import LightKV
from lightkv_core.methods.random_drop import RandomDrop

__all__ = ["FastV", "LightKV", "PrefillReduction", "RandomDrop", "attention_received"]
