"""Compression methods on two interfaces (:class:`PrefillReduction`, :class:`KVEviction`), one file each,
selectable by name through :data:`METHODS` / :func:`method_by_name`."""

from lightkv_core.methods.aircache import AirCache
from lightkv_core.methods.base import KVEviction, LayerEviction, PrefillReduction
from lightkv_core.methods.fastv import FastV, mean_received_attention
from lightkv_core.methods.lightkv import LightKV
from lightkv_core.methods.lookm import LookM
from lightkv_core.methods.prefixkv import PrefixKV
from lightkv_core.methods.random_drop import RandomDrop
from lightkv_core.methods.registry import METHODS, CompressionMethod, method_by_name
from lightkv_core.methods.unguided import UnguidedMerge

__all__ = [
    "METHODS",
    "AirCache",
    "CompressionMethod",
    "FastV",
    "KVEviction",
    "LayerEviction",
    "LightKV",
    "LookM",
    "PrefillReduction",
    "PrefixKV",
    "RandomDrop",
    "UnguidedMerge",
    "mean_received_attention",
    "method_by_name",
]
