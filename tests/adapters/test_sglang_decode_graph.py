"""The decode-graph hooks (``lightkv_adapters.sglang.decode_graph``) on what they must leave alone: a backend
without layer groups, another attention backend, a forward mode other than decode; and the clear error when SGLang
prepares a graph before its state exists. Capture and replay themselves are tested in test_sglang_models.py."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest

if importlib.util.find_spec("sglang") is None:
    pytest.skip("SGLang is not installed", allow_module_level=True)

from lightkv_adapters.sglang import cpu_env  # noqa: E402

cpu_env.install()

from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

from lightkv_adapters.sglang.decode_graph import (  # noqa: E402
    GRAPH_ATTRIBUTE,
    DecodeGraph,
    attach_decode_graph_hook,
    graph_metadata_hook,
    graph_state_hook,
)


class _Backend:
    """An attention backend as the hooks see one (only its attributes)."""


class _Groups:
    def __init__(self) -> None:
        self.decode_graph = None


def test_only_a_triton_backend_of_a_model_with_layer_groups_gets_a_decode_graph():
    groups = _Groups()
    other = _Backend()
    attach_decode_graph_hook(None, SimpleNamespace(model=SimpleNamespace(lightkv_groups=groups), attn_backend=other))
    assert groups.decode_graph is None and GRAPH_ATTRIBUTE not in other.__dict__
    attach_decode_graph_hook(None, SimpleNamespace(model=SimpleNamespace(), attn_backend=other))
    assert GRAPH_ATTRIBUTE not in other.__dict__


def test_backends_without_a_decode_graph_are_left_alone():
    backend = _Backend()
    graph_state_hook(None, backend, 4, 4)
    graph_metadata_hook(None, backend, SimpleNamespace(forward_mode=ForwardMode.DECODE), in_capture=True)
    assert backend.__dict__ == {}


def test_graph_metadata_before_graph_state_is_a_clear_error_and_extend_graphs_are_not_touched():
    backend = _Backend()
    graph = DecodeGraph(_Groups(), backend, _Backend)
    backend.__dict__[GRAPH_ATTRIBUTE] = graph
    assert not graph.ready
    graph_metadata_hook(None, backend, SimpleNamespace(forward_mode=ForwardMode.EXTEND), in_capture=True)
    with pytest.raises(RuntimeError, match="a decode graph's metadata is prepared before its state was allocated"):
        graph_metadata_hook(None, backend, SimpleNamespace(forward_mode=ForwardMode.DECODE), in_capture=True)
