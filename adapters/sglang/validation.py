"""Whether SGLang's server arguments (and the installed SGLang) can run ``--kv-compress``: :func:`validate`.

Each problem names the flag (and ``Engine`` keyword) that fixes it; the README (SGLang) lists what is refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import sglang

if TYPE_CHECKING:
    from sglang.srt.server_args import ServerArgs

    from lightkv_adapters.sglang.settings import KVCompressSettings

#: Attention backends that run a prefill whose vision tokens shrink between layers.
ATTENTION_BACKENDS = ("triton", "torch_native")
#: Environment variable opting in to decode CUDA graphs (``1``), which have not run on a GPU yet.
GRAPH_DECODE_ENV = "LIGHTKV_CUDA_GRAPH_DECODE"
#: SGLang releases whose internals (scheduler, memory pools, model runner) the plugin is tested against.
TESTED_SGLANG = ("0.5.23",)


def validate(server_args: ServerArgs, settings: KVCompressSettings) -> None:
    """Checks that the installed SGLang is a tested release (:data:`TESTED_SGLANG`) and will run a prefill that
    compression can shorten: prompts with images in one piece (chunked prefill splits text-only ones only; the
    radix cache keeps them out), without prefill CUDA graphs (decode graphs run on the triton backend, opted in),
    pipeline or data-parallel attention ranks, mixed prefill-decode forwards or speculative decoding, on an
    attention backend that takes per-layer KV lengths. Reads the arguments as given (before SGLang resolves them):
    an argument left to SGLang's automatic choice counts as incompatible where that choice can be.

    Raises:
        ValueError listing every problem with the flag (and ``Engine`` keyword) that fixes it.
    """
    if not settings.enabled:
        return
    problems = list(_problems(server_args))
    if problems:
        raise ValueError(
            f"--kv-compress {settings.method} cannot run with these server arguments:\n"
            + "\n".join(f"  - {problem}" for problem in problems)
        )


def _problems(server_args: ServerArgs) -> Iterator[str]:
    """What in ``server_args`` (or the installed SGLang) keeps compression from running, one sentence each."""
    if sglang.__version__ not in TESTED_SGLANG:
        yield (
            f"SGLang {sglang.__version__} is not a release this plugin is tested with ({', '.join(TESTED_SGLANG)}); "
            "the plugin patches SGLang's scheduler, memory pools and model runner, and on other internals it "
            f"could keep a wrong KV layout without an error; install sglang=={TESTED_SGLANG[-1]}"
        )
    yield from _chunked_prefill_problems(server_args)
    yield from _cuda_graph_problems(server_args)
    yield from _attention_backend_problems(server_args)
    if server_args.pp_size > 1:
        yield (
            f"--pp-size {server_args.pp_size}: pipeline stages would each hold part of the layer groups and pass "
            "shortened hidden states between ranks; pass --pp-size 1 (Engine: pp_size=1)"
        )
    if server_args.attn_dp_size > 1 or server_args.enable_dp_attention:
        yield (
            "data-parallel attention (--attn-dp-size > 1, --enable-dp-attention) is not supported; drop it "
            "(Engine: attn_dp_size=1)"
        )
    if server_args.disaggregation_mode != "null":
        yield (
            f"--disaggregation-mode {server_args.disaggregation_mode}: prefill-decode disaggregation would hand "
            "the compressed KV to a decode server that does not know its layout; drop it "
            "(Engine: disaggregation_mode='null')"
        )
    if server_args.speculative_algorithm is not None or server_args.decoupled_spec_role != "null":
        yield (
            "speculative decoding (--speculative-algorithm, --decoupled-spec-role) is not supported; drop it "
            "(Engine: speculative_algorithm=None)"
        )


def _chunked_prefill_problems(server_args: ServerArgs) -> Iterator[str]:
    """Chunked prefill itself runs (prompts with images are admitted whole: ``admission.admission_hook``); mixing
    decode steps into a prefill forward does not."""
    size = server_args.chunked_prefill_size
    if (size is None or size > 0) and server_args.enable_mixed_chunk:
        yield (
            "--enable-mixed-chunk runs decode steps inside a prefill forward, where a compressed request's layer "
            "groups would be read as a prompt's; drop it (Engine: enable_mixed_chunk=False)"
        )


def _cuda_graph_problems(server_args: ServerArgs) -> Iterator[str]:
    """Prefill graphs are refused (a reduction changes the lengths a captured prefill fixes); decode graphs run on
    the triton attention backend, opted in with :data:`GRAPH_DECODE_ENV` until they have run on a GPU."""
    on = {phase: backend for phase, backend in _cuda_graph_backends(server_args).items() if backend != "disabled"}
    decode = on.pop("decode", None)
    if decode is not None:
        reason = _decode_graph_refusal(server_args, decode)
        if reason is not None:
            yield (
                f"CUDA graphs are on (decode: {decode}) but {reason}; or pass --cuda-graph-backend-decode disabled "
                "(Engine: cuda_graph_backend_decode='disabled')"
            )
    if on:
        also = " and no other backend in --cuda-graph-config" if server_args.cuda_graph_config else ""
        yield (
            f"CUDA graphs are on (prefill: {on['prefill']}): a captured prefill fixes the sequence lengths that "
            f"lightkv's reductions shorten; pass --cuda-graph-backend-prefill disabled{also} "
            "(Engine: cuda_graph_backend_prefill='disabled')"
        )


def _decode_graph_refusal(server_args: ServerArgs, backend: str) -> str | None:
    """Why decode graphs of ``backend`` cannot run with ``server_args`` (``None``: they can)."""
    if backend != "full":
        return "only full decode graphs run with lightkv's layer groups: pass --cuda-graph-backend-decode full"
    if server_args.device == "cpu":
        return (
            "on a CPU SGLang's decode graphs are its torch.compile runner, not the CUDA graphs lightkv's layer groups "
            "are built for: pass --cuda-graph-backend-decode disabled"
        )
    attention = server_args.decode_attention_backend or server_args.attention_backend
    if attention != "triton":
        return (
            f"lightkv's decode graphs need the triton attention backend (decode: {attention or 'automatic'}), which "
            "it gives one backend per layer group: pass --attention-backend triton"
        )
    if server_args.enable_torch_compile:
        return "--enable-torch-compile would trace lightkv's layer-group views: drop it"
    if os.environ.get(GRAPH_DECODE_ENV) != "1":
        return (
            f"lightkv's CUDA-graph decode has run on a CPU emulation of capture and replay only, not on a GPU yet: "
            f"set {GRAPH_DECODE_ENV}=1 to use it"
        )
    return None


def _cuda_graph_backends(server_args: ServerArgs) -> dict[str, str]:
    """Each phase's CUDA graph backend, by the precedence of SGLang's ``parse_cuda_graph_config``:
    ``--cuda-graph-config`` JSON, then ``--cuda-graph-backend-<phase>``, then the ``--disable-*cuda-graph``
    switches, then SGLang's default (decode ``full``; prefill ``breakable`` on CUDA)."""
    from sglang.srt.model_executor.cuda_graph_config import CudaGraphConfig, Phase, default_cuda_graph_config

    raw = server_args.cuda_graph_config
    explicit: Mapping = raw.to_dict() if isinstance(raw, CudaGraphConfig) else (raw or {})
    defaults = default_cuda_graph_config()
    backends = {}
    for phase in Phase.ALL:
        backend = (explicit.get(phase) or {}).get("backend") or getattr(server_args, f"cuda_graph_backend_{phase}")
        if backend is None:
            switched_off = server_args.disable_cuda_graph or getattr(server_args, f"disable_{phase}_cuda_graph")
            backend = "disabled" if switched_off else getattr(defaults, phase).backend
        backends[phase] = backend
    return backends


def _attention_backend_problems(server_args: ServerArgs) -> Iterator[str]:
    unset, unsupported = [], {}
    for phase in ("prefill", "decode"):
        own = getattr(server_args, f"{phase}_attention_backend")
        flag, backend = (
            (f"--{phase}-attention-backend", own) if own else ("--attention-backend", server_args.attention_backend)
        )
        if backend is None:
            unset.append(phase)
        elif backend not in ATTENTION_BACKENDS:
            unsupported[flag] = backend
    if unset:
        yield (
            f"the {' and '.join(unset)} attention backend is left to SGLang's automatic choice (flashinfer, fa3, "
            "intel_amx, ...); pass --attention-backend triton (GPU) or torch_native (CPU) "
            "(Engine: attention_backend='triton')"
        )
    for flag, backend in unsupported.items():
        kwarg = flag[2:].replace("-", "_")
        yield f"{flag} {backend} is not supported; use triton or torch_native (Engine: {kwarg}='triton')"
