"""Server arguments for the SGLang plugin's tests (``tests/adapters/test_sglang_plugin_*.py``): the arguments
compression runs with, as flags and as ``ServerArgs`` fields, and LightKV settings with their flags.

Imports SGLang: import it only from modules that skip where SGLang is not installed.
"""

from __future__ import annotations

from lightkv_adapters.sglang import cpu_env

cpu_env.install()

from sglang.srt.server_args import ServerArgs  # noqa: E402

from lightkv_adapters.sglang.settings import KVCompressSettings  # noqa: E402

#: Server arguments compression runs with, as flags and as ``ServerArgs`` fields.
COMPATIBLE_FLAGS = [
    "--disable-radix-cache",
    "--chunked-prefill-size=-1",
    "--cuda-graph-backend-decode=disabled",
    "--cuda-graph-backend-prefill=disabled",
    "--disable-overlap-schedule",
    "--attention-backend=torch_native",
]
COMPATIBLE = dict(
    disable_radix_cache=True,
    chunked_prefill_size=-1,
    cuda_graph_backend_decode="disabled",
    cuda_graph_backend_prefill="disabled",
    disable_overlap_schedule=True,
    attention_backend="torch_native",
)
LIGHTKV = KVCompressSettings("lightkv", (2, 4), (4, 2), (0.5, 0.25))
LIGHTKV_FLAGS = [
    "--kv-compress=lightkv",
    "--kv-compress-layers=2,4",
    "--kv-compress-windows=4,2",
    "--kv-compress-ratios=0.5,0.25",
]


def server_args_with(**fields) -> ServerArgs:
    """``ServerArgs`` for model ``m`` with the :data:`COMPATIBLE` arguments, overridden by ``fields``."""
    return ServerArgs(model_path="m", **{**COMPATIBLE, **fields})
