"""``sglang.Engine`` with the ``--kv-compress*`` settings as keyword arguments.

    from lightkv_adapters.sglang.engine import Engine
    engine = Engine(model_path="Qwen/Qwen2.5-VL-7B-Instruct", kv_compress="lightkv", attention_backend="triton",
                    cuda_graph_backend_decode="disabled", cuda_graph_backend_prefill="disabled")

SGLang's own ``Engine(**kwargs)`` passes every keyword to ``ServerArgs``, which has no ``kv_compress`` field.
"""

from __future__ import annotations

from typing import Any

import msgspec
from sglang.srt.entrypoints.engine import Engine as SGLangEngine
from sglang.srt.sampling.watermarking.core import redact_watermark_secrets
from sglang.srt.server_args import ServerArgs

from lightkv_adapters.sglang.plugin import install
from lightkv_adapters.sglang.settings import KV_COMPRESS_KWARGS, attach_settings, kv_compress_settings, settings_of


def build_server_args(**kwargs: Any) -> ServerArgs:
    """``ServerArgs(**kwargs)`` with the ``kv_compress*`` keywords (see
    :func:`~lightkv_adapters.sglang.settings.kv_compress_settings`) checked and attached; for
    ``sglang.Engine(server_args=...)`` or anything else that takes a ``ServerArgs``.

    Raises:
        ValueError if the compression settings are invalid or do not fit the other arguments.
    """
    compress = {name: kwargs.pop(name) for name in KV_COMPRESS_KWARGS if name in kwargs}
    server_args = ServerArgs(**kwargs)
    attach_settings(server_args, kv_compress_settings(**compress))
    return server_args


class Engine(SGLangEngine):
    """``sglang.Engine`` that also takes ``kv_compress``, ``kv_compress_layers``, ``kv_compress_windows`` and
    ``kv_compress_ratios`` (lists as sequences or comma-separated strings), with the other keywords as SGLang's.

    ``Engine(server_args=..., kv_compress=...)`` attaches the settings to a ready ``ServerArgs``; without
    ``kv_compress*`` keywords it keeps the settings the ``ServerArgs`` already carries. The plugin is installed
    in this process (and routed into the engine's subprocesses) even where ``SGLANG_PLUGINS`` leaves it out.
    """

    def __init__(self, **kwargs: Any) -> None:
        install()
        server_args = kwargs.pop("server_args", None)
        if server_args is None:
            kwargs.setdefault("log_level", "error")  # SGLang's Engine default
            server_args = build_server_args(**kwargs)
            call = ", ".join(f"{name}={value!r}" for name, value in redact_watermark_secrets(kwargs).items())
            msgspec.Struct.__setattr__(server_args, "_launch_command", f"Engine({call})")
        else:
            compress = {name: kwargs.pop(name) for name in KV_COMPRESS_KWARGS if name in kwargs}
            if kwargs:
                raise TypeError(f"Engine(server_args=...) takes no other server arguments, got {sorted(kwargs)}")
            attach_settings(server_args, kv_compress_settings(**compress) if compress else settings_of(server_args))
        super().__init__(server_args=server_args)
