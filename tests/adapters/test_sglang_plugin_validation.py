"""The SGLang plugin's compatibility checks (``lightkv_adapters.sglang.validation``) on SGLang's real
``ServerArgs`` (CPU): each incompatible server argument named with its fix, the compatible ones passing, the
default CUDA prefill graph, nothing checked without compression, an untested SGLang release refused, and every
problem listed at once.
"""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("sglang") is None:
    pytest.skip("SGLang is not installed", allow_module_level=True)

from lightkv_adapters.sglang import cpu_env  # noqa: E402

cpu_env.install()

from helpers.sglang_plugin import LIGHTKV, server_args_with  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402

from lightkv_adapters.sglang.settings import KVCompressSettings  # noqa: E402
from lightkv_adapters.sglang.validation import GRAPH_DECODE_ENV, validate  # noqa: E402


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"chunked_prefill_size": 8192, "enable_mixed_chunk": True}, "--enable-mixed-chunk runs decode steps"),
        ({"chunked_prefill_size": None, "enable_mixed_chunk": True}, "drop it (Engine: enable_mixed_chunk=False)"),
        (
            {"cuda_graph_backend_decode": None},
            "CUDA graphs are on (decode: full) but lightkv's decode graphs need the triton attention backend "
            "(decode: torch_native)",
        ),
        (
            {"cuda_graph_backend_decode": None, "attention_backend": "triton"},
            "not on a GPU yet: set LIGHTKV_CUDA_GRAPH_DECODE=1 to use it; or pass --cuda-graph-backend-decode disabled",
        ),
        (
            {"cuda_graph_backend_decode": None, "attention_backend": "triton", "device": "cpu"},
            "on a CPU SGLang's decode graphs are its torch.compile runner",
        ),
        (
            {"cuda_graph_backend_decode": "breakable", "attention_backend": "triton"},
            "(decode: breakable) but only full decode graphs run with lightkv's layer groups",
        ),
        (
            {"cuda_graph_backend_prefill": "breakable"},
            "(prefill: breakable): a captured prefill fixes the sequence lengths that lightkv's reductions shorten; "
            "pass --cuda-graph-backend-prefill disabled (Engine",
        ),
        (
            {
                "cuda_graph_backend_decode": None,
                "disable_cuda_graph": True,
                "cuda_graph_config": {"decode": {"backend": "full"}},
            },
            "CUDA graphs are on (decode: full) but",
        ),
        (
            {"cuda_graph_backend_prefill": None, "cuda_graph_config": {"prefill": {"backend": "breakable"}}},
            "pass --cuda-graph-backend-prefill disabled and no other backend in --cuda-graph-config",
        ),
        ({"attention_backend": None}, "the prefill and decode attention backend is left to SGLang's automatic choice"),
        ({"attention_backend": "flashinfer"}, "--attention-backend flashinfer is not supported"),
        ({"prefill_attention_backend": "fa3"}, "--prefill-attention-backend fa3 is not supported"),
        ({"decode_attention_backend": "flashinfer"}, "--decode-attention-backend flashinfer is not supported"),
        ({"attention_backend": None, "decode_attention_backend": "triton"}, "the prefill attention backend is left"),
        ({"pp_size": 2}, "--pp-size 2: pipeline stages would each hold part of the layer groups"),
        ({"attn_dp_size": 2}, "data-parallel attention"),
        ({"enable_dp_attention": True}, "data-parallel attention"),
        ({"speculative_algorithm": "EAGLE"}, "speculative decoding"),
        ({"decoupled_spec_role": "verifier"}, "speculative decoding"),
        ({"disaggregation_mode": "prefill"}, "--disaggregation-mode prefill: prefill-decode disaggregation"),
    ],
)
def test_each_incompatibility_names_its_fix(fields, message, monkeypatch):
    monkeypatch.delenv(GRAPH_DECODE_ENV, raising=False)
    with pytest.raises(ValueError) as error:
        validate(server_args_with(**fields), KVCompressSettings("fastv"))
    text = str(error.value)
    assert text.startswith("--kv-compress fastv cannot run with these server arguments:\n  - ")
    assert message in text
    assert text.count("\n  - ") == 1


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"disable_radix_cache": False},
        {"disable_overlap_schedule": False},
        {"chunked_prefill_size": 8192, "context_length": 8192},
        {"chunked_prefill_size": None},
        {"chunked_prefill_size": 8192},
        {"chunked_prefill_size": 4096, "context_length": 8192},
        {"chunked_prefill_size": -1, "enable_mixed_chunk": True},
        {"chunked_prefill_size": 0},
        {"cuda_graph_backend_decode": None, "cuda_graph_backend_prefill": None, "disable_cuda_graph": True},
        {"cuda_graph_backend_decode": None, "disable_decode_cuda_graph": True, "disable_prefill_cuda_graph": True},
        {
            "cuda_graph_backend_decode": None,
            "cuda_graph_backend_prefill": None,
            "cuda_graph_config": {"decode": {"backend": "disabled"}, "prefill": {"backend": "disabled"}},
        },
        {"attention_backend": "triton"},
        {"attention_backend": None, "prefill_attention_backend": "torch_native", "decode_attention_backend": "triton"},
        {"dp_size": 2},
        {"tp_size": 2},
    ],
)
def test_compatible_arguments_pass(fields):
    validate(server_args_with(**fields), LIGHTKV)


def test_decode_graphs_on_triton_run_when_opted_in(monkeypatch):
    """Full decode graphs on the triton backend pass once ``LIGHTKV_CUDA_GRAPH_DECODE=1`` opts in (they have run
    on a CPU emulation of capture and replay, not on a GPU yet); ``--enable-torch-compile`` stays refused."""
    monkeypatch.setenv(GRAPH_DECODE_ENV, "1")
    validate(server_args_with(cuda_graph_backend_decode=None, attention_backend="triton"), LIGHTKV)
    validate(server_args_with(cuda_graph_backend_decode="full", decode_attention_backend="triton"), LIGHTKV)
    compiled = server_args_with(cuda_graph_backend_decode=None, attention_backend="triton", enable_torch_compile=True)
    with pytest.raises(ValueError, match=r"--enable-torch-compile would trace lightkv's layer-group views: drop it"):
        validate(compiled, LIGHTKV)
    monkeypatch.setenv(GRAPH_DECODE_ENV, "0")
    with pytest.raises(ValueError, match=r"set LIGHTKV_CUDA_GRAPH_DECODE=1 to use it"):
        validate(server_args_with(cuda_graph_backend_decode=None, attention_backend="triton"), LIGHTKV)


def test_the_default_prefill_graph_of_cuda_counts(monkeypatch):
    import sglang.srt.model_executor.cuda_graph_config as cuda_graph_config

    monkeypatch.setattr(cuda_graph_config, "default_prefill_backend", lambda: "breakable")
    monkeypatch.setenv(GRAPH_DECODE_ENV, "1")
    server_args = server_args_with(cuda_graph_backend_decode=None, cuda_graph_backend_prefill=None)
    server_args.attention_backend = "triton"
    with pytest.raises(ValueError) as error:
        validate(server_args, LIGHTKV)
    assert "(prefill: breakable): a captured prefill fixes" in str(error.value)
    assert str(error.value).count("\n  - ") == 1  # the decode graph is fine


def test_nothing_is_checked_without_compression():
    validate(ServerArgs(model_path="m", tp_size=4, attention_backend="flashinfer"), KVCompressSettings())


def test_an_untested_sglang_is_refused_only_when_compression_is_on(monkeypatch):
    import sglang

    monkeypatch.setattr(sglang, "__version__", "0.5.24")
    with pytest.raises(ValueError, match=r"SGLang 0\.5\.24 is not a release this plugin is tested with \(0\.5\.23\)"):
        validate(server_args_with(attention_backend="triton"), LIGHTKV)
    validate(server_args_with(attention_backend="triton"), KVCompressSettings())


def test_every_problem_is_listed_at_once():
    with pytest.raises(ValueError) as error:
        validate(ServerArgs(model_path="m", tp_size=2, speculative_algorithm="EAGLE"), LIGHTKV)
    assert str(error.value).count("\n  - ") == 3  # CUDA graph, attention, speculative
