"""The SGLang plugin: ``--kv-compress`` on SGLang's command line and its model classes in SGLang's registry.

SGLang runs :func:`register` (entry point ``lightkv`` of the group ``sglang.srt.plugins``) in every server
process, then applies the hooks registered here:

* ``ServerArgs.add_cli_args`` (after): adds the ``--kv-compress*`` argument group to SGLang's parser;
* ``ServerArgs.from_cli_args`` (after): turns the parsed flags (command line or ``--config`` file) into a
  :class:`~lightkv_adapters.sglang.settings.KVCompressSettings`, checks it against the other server
  arguments (:func:`validate`) and attaches it to the ``ServerArgs``, which carries it into every subprocess.

:func:`route_models` puts this package's model classes (``lightkv_adapters.sglang.models``) in place of SGLang's
for their architectures, as soon as SGLang's model registry is imported (the launcher and the detokenizer never
import it, so they do not pay for the model modules). Where ``SGLANG_PLUGINS`` keeps SGLang from loading this
plugin, :func:`install` does it all in the calling process and names the model package in
``SGLANG_EXTERNAL_MODEL_PACKAGE`` for the processes it spawns (``lightkv_adapters.sglang.launch_server``,
:class:`lightkv_adapters.sglang.engine.Engine`).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import operator
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

import msgspec
import sglang
from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from lightkv_adapters.sglang.settings import (
    KV_COMPRESS_METHODS,
    SETTINGS_ATTRIBUTE,
    KVCompressSettings,
    parse_list,
    settings_of,
)

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec
    from types import ModuleType

    from sglang.srt.server_args import ServerArgs

logger = logging.getLogger(__name__)

#: Name of the entry point (what ``SGLANG_PLUGINS`` lists to allow it).
PLUGIN_NAME = "lightkv"
#: Package holding the model classes, each module with SGLang's ``EntryClass`` list.
MODELS_PACKAGE = "lightkv_adapters.sglang.models"
#: SGLang's environment variable naming one extra model package, imported before its own models.
MODELS_PACKAGE_ENV = "SGLANG_EXTERNAL_MODEL_PACKAGE"
#: The module defining SGLang's ``ModelRegistry``.
REGISTRY_MODULE = "sglang.srt.models.registry"
#: Keyword arguments (``Engine``) and ``argparse`` destinations of the ``--kv-compress*`` flags.
KV_COMPRESS_KWARGS = (
    "kv_compress",
    "kv_compress_layers",
    "kv_compress_windows",
    "kv_compress_ratios",
    "kv_compress_pool_ratios",
)
#: Words ``--kv-compress-pool-ratios`` takes besides a list of ratios.
POOL_RATIO_WORDS = ("auto", "off")
#: Attention backends that run a prefill whose vision tokens shrink between layers.
ATTENTION_BACKENDS = ("triton", "torch_native")
#: SGLang releases whose internals (scheduler, memory pools, model runner) the plugin is tested against.
TESTED_SGLANG = ("0.5.23",)

_registered = False


def register() -> None:
    """Entry point: registers this plugin's hooks with SGLang's ``HookRegistry`` (SGLang applies them) and
    routes the model architectures to this package's classes. Idempotent."""
    global _registered
    if _registered:
        return
    _registered = True
    HookRegistry.register("sglang.srt.server_args.ServerArgs.add_cli_args", _add_cli_args_hook, HookType.AFTER)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.from_cli_args", _from_cli_args_hook, HookType.AFTER)
    for target, hook, kind in POOL_HOOKS:
        HookRegistry.register(target, hook, kind)
    route_models()


def install() -> None:
    """Registers and applies this plugin in the calling process, for launchers that cannot rely on SGLang's
    plugin loading. If SGLang will not load the plugin in the processes spawned from here (``SGLANG_PLUGINS``
    leaves it out, or the entry point is not installed), names :data:`MODELS_PACKAGE` in
    ``SGLANG_EXTERNAL_MODEL_PACKAGE`` so their model registry resolves this package's classes (SGLang's other
    architectures still resolve: the registry then imports its own models on first use of one).

    Raises:
        RuntimeError if ``SGLANG_EXTERNAL_MODEL_PACKAGE`` already names another package in that case.
    """
    register()
    HookRegistry.apply_hooks()
    if _loaded_by_sglang():
        return
    current = os.environ.get(MODELS_PACKAGE_ENV, "")
    if current not in ("", MODELS_PACKAGE):
        raise RuntimeError(
            f"SGLANG_PLUGINS={os.environ.get('SGLANG_PLUGINS', '')!r} keeps SGLang's processes from loading the "
            f"{PLUGIN_NAME!r} plugin, and {MODELS_PACKAGE_ENV}={current!r} leaves no room for its model package "
            f"{MODELS_PACKAGE!r}: add {PLUGIN_NAME} to SGLANG_PLUGINS"
        )
    os.environ[MODELS_PACKAGE_ENV] = MODELS_PACKAGE


def _loaded_by_sglang() -> bool:
    """Whether SGLang's ``load_plugins`` runs this plugin (entry point installed and allowed by ``SGLANG_PLUGINS``)."""
    if not entry_points(group="sglang.srt.plugins", name=PLUGIN_NAME):
        return False
    from sglang.srt.environ import envs

    allowed = {name.strip() for name in envs.SGLANG_PLUGINS.get().split(",") if name.strip()}
    return not allowed or PLUGIN_NAME in allowed


# --- command line ----------------------------------------------------------------------------------------------


def add_kv_compress_args(parser: argparse.ArgumentParser) -> None:
    """Adds the ``--kv-compress*`` argument group to ``parser``."""
    group = parser.add_argument_group(
        "KV cache compression (lightkv)",
        "Shrink the vision tokens' KV cache during prefill (Qwen2-VL, Qwen2.5-VL, LLaVA on Llama or Qwen2). "
        "Needs --disable-radix-cache, --chunked-prefill-size -1, --cuda-graph-backend-decode disabled, "
        "--cuda-graph-backend-prefill disabled, --disable-overlap-schedule and --attention-backend triton "
        "(GPU) or torch_native (CPU), on one GPU without speculative decoding.",
    )
    group.add_argument(
        "--kv-compress",
        choices=KV_COMPRESS_METHODS,
        default="none",
        help="'lightkv': merge similar vision tokens at a few decoder layers, guided by the prompt's attention "
        "to them (LightKV); 'fastv': drop the vision tokens the prompt attends to least, once (FastV); "
        "'none' (default): leave the model as it is.",
    )
    group.add_argument(
        "--kv-compress-layers",
        type=_cli_list(int, "--kv-compress-layers"),
        default=None,
        help="Comma-separated 0-based decoder layers whose output is compressed, e.g. 12,18,24 (LightKV: one per "
        "stage; FastV: one layer). Default: the model family's released schedule scaled to its depth.",
    )
    group.add_argument(
        "--kv-compress-windows",
        type=_cli_list(int, "--kv-compress-windows"),
        default=None,
        help="LightKV only: comma-separated windows per image side, one per stage, e.g. 4,2,1. "
        "Default: the model family's released schedule.",
    )
    group.add_argument(
        "--kv-compress-ratios",
        type=_cli_list(float, "--kv-compress-ratios"),
        default=None,
        help="LightKV: comma-separated fraction of each window's tokens merged per stage, e.g. 0.5,0.5,0.5; "
        "FastV: the one fraction of vision tokens dropped, e.g. 0.5. Default: the released values.",
    )
    group.add_argument(
        "--kv-compress-pool-ratios",
        type=_pool_ratios_arg,
        default=None,
        help="Each layer group between two compressed layers gets its own KV pool, so compression frees memory: "
        "comma-separated slots of each group after the first per slot of the first, e.g. 0.52,0.28,0.16; "
        "'auto' (default): derived from the schedule for vision-dominated prompts; 'off': one pool for all "
        "layers (compression then saves compute, not memory).",
    )


def _pool_ratios_arg(text: str) -> str | tuple:
    """``argparse`` type of ``--kv-compress-pool-ratios``: ``auto``, ``off`` or a list of ratios."""
    if text.strip().lower() in POOL_RATIO_WORDS:
        return text.strip().lower()
    return _cli_list(float, "--kv-compress-pool-ratios")(text)


def _cli_list(kind: type, flag: str) -> Callable[[str], tuple]:
    """``argparse`` type for a comma-separated list of ``kind``, reporting a bad value as a usage error."""

    def parse(text: str) -> tuple:
        try:
            return _as_tuple(text, kind, flag)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _add_cli_args_hook(result: None, parser: argparse.ArgumentParser) -> None:
    """After ``ServerArgs.add_cli_args(parser)``."""
    add_kv_compress_args(parser)


def _from_cli_args_hook(server_args: ServerArgs, cls: type, namespace: argparse.Namespace) -> None:
    """After ``ServerArgs.from_cli_args(namespace)``: attaches the parsed ``--kv-compress*`` flags (a namespace
    from another parser, without them, gets ``none``)."""
    values = {name: getattr(namespace, name) for name in KV_COMPRESS_KWARGS if hasattr(namespace, name)}
    attach_settings(server_args, kv_compress_settings(**values))


# --- settings --------------------------------------------------------------------------------------------------


def kv_compress_settings(
    kv_compress: str = "none",
    kv_compress_layers: str | Iterable[int] | int | None = None,
    kv_compress_windows: str | Iterable[int] | int | None = None,
    kv_compress_ratios: str | Iterable[float] | float | None = None,
    kv_compress_pool_ratios: str | Iterable[float] | float | None = None,
) -> KVCompressSettings:
    """The settings the ``--kv-compress*`` flags (or ``Engine`` keyword arguments of the same names) ask for.
    Lists are comma-separated strings, sequences or single numbers; ``kv_compress_pool_ratios`` also takes
    ``"auto"`` (the default) or ``"off"``.

    Raises:
        ValueError naming the flag whose value is wrong.
    """
    return KVCompressSettings(
        kv_compress,
        _as_tuple(kv_compress_layers, int, "--kv-compress-layers"),
        _as_tuple(kv_compress_windows, int, "--kv-compress-windows"),
        _as_tuple(kv_compress_ratios, float, "--kv-compress-ratios"),
        grouped_pools=not (isinstance(kv_compress_pool_ratios, str) and kv_compress_pool_ratios.lower() == "off"),
        pool_ratios=None
        if isinstance(kv_compress_pool_ratios, str) and kv_compress_pool_ratios.lower() in POOL_RATIO_WORDS
        else _as_tuple(kv_compress_pool_ratios, float, "--kv-compress-pool-ratios"),
    )


def _as_tuple(value: str | Iterable | float | None, kind: type, flag: str) -> tuple | None:
    if value is None:
        return None
    if isinstance(value, str):
        items = parse_list(value, kind, flag)
    else:
        convert = operator.index if kind is int else kind
        try:
            items = tuple(convert(item) for item in (value if isinstance(value, Iterable) else (value,)))
        except (TypeError, ValueError):
            raise ValueError(f"{flag} takes {kind.__name__}s, got {value!r}") from None
    if not items:
        raise ValueError(f"{flag} needs at least one value")
    return items


def attach_settings(server_args: ServerArgs, settings: KVCompressSettings) -> None:
    """Checks ``settings`` against ``server_args`` (:func:`validate`), then attaches them as the non-field
    attribute ``SETTINGS_ATTRIBUTE``, which ``ServerArgs`` keeps through pickling into SGLang's subprocesses
    and through resolution."""
    validate(server_args, settings)
    msgspec.Struct.__setattr__(server_args, SETTINGS_ATTRIBUTE, settings)


def validate(server_args: ServerArgs, settings: KVCompressSettings) -> None:
    """Checks that the installed SGLang is a tested release (:data:`TESTED_SGLANG`) and will run a prefill that
    compression can shorten: one whole prompt per forward, on one GPU, without CUDA graphs, overlap scheduling,
    prefix caching or speculative decoding, on an attention backend that takes per-layer KV lengths. Reads the
    arguments as given (before SGLang resolves them): an argument left to SGLang's automatic choice counts as
    incompatible where that choice can be.

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
    if not server_args.disable_radix_cache:
        yield (
            "the radix (prefix) cache is on (the default), and one prompt's compressed KV cannot be another's "
            "prefix; pass --disable-radix-cache (Engine: disable_radix_cache=True)"
        )
    yield from _chunked_prefill_problems(server_args)
    yield from _cuda_graph_problems(server_args)
    if not server_args.disable_overlap_schedule:
        yield (
            "overlap scheduling is on (the default); pass --disable-overlap-schedule "
            "(Engine: disable_overlap_schedule=True)"
        )
    yield from _attention_backend_problems(server_args)
    for flag, kwarg, size in (
        ("--tp-size", "tp_size", server_args.tp_size),
        ("--pp-size", "pp_size", server_args.pp_size),
    ):
        if size > 1:
            yield f"{flag} {size}: only one GPU per model replica is supported; pass {flag} 1 (Engine: {kwarg}=1)"
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
    size, context = server_args.chunked_prefill_size, server_args.context_length
    fix = "pass --chunked-prefill-size -1 (Engine: chunked_prefill_size=-1)"
    if size is None:
        yield f"chunked prefill is on by default, with an automatic chunk size that can split a prompt; {fix}"
    elif size > 0 and (context is None or size < context):
        limit = "without --context-length" if context is None else f"below --context-length {context}"
        yield f"--chunked-prefill-size {size} can split a prompt ({limit}); {fix} or a size >= --context-length"
    elif size > 0 and server_args.enable_mixed_chunk:
        yield "--enable-mixed-chunk prefills while decoding in one forward; drop it (Engine: enable_mixed_chunk=False)"


def _cuda_graph_problems(server_args: ServerArgs) -> Iterator[str]:
    on = {phase: backend for phase, backend in _cuda_graph_backends(server_args).items() if backend != "disabled"}
    if on:
        phases = ", ".join(f"{phase}: {backend}" for phase, backend in on.items())
        flags = " ".join(f"--cuda-graph-backend-{phase} disabled" for phase in on)
        kwargs = ", ".join(f"cuda_graph_backend_{phase}='disabled'" for phase in on)
        also = " and no other backend in --cuda-graph-config" if server_args.cuda_graph_config else ""
        yield f"CUDA graphs are on ({phases}); pass {flags}{also} (Engine: {kwargs})"


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


# --- model registry --------------------------------------------------------------------------------------------


def route_models() -> None:
    """Resolves this package's architectures to its classes in SGLang's ``ModelRegistry``: now if the registry
    is imported, otherwise right after its module is first imported (:class:`_RouteOnImport`)."""
    registry = sys.modules.get(REGISTRY_MODULE)
    if registry is not None:
        _route_architectures(registry)
    elif not any(isinstance(finder, _RouteOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RouteOnImport())


class _RouteOnImport:
    """Import-system finder that lets the other finders find :data:`REGISTRY_MODULE` and routes the
    architectures once the module has run; it leaves ``sys.meta_path`` on first use."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        if fullname != REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        loader = spec.loader if spec is not None else None
        if loader is None:
            return spec

        def exec_module(module: ModuleType) -> None:
            del loader.exec_module  # the loader's own method again
            loader.exec_module(module)
            _route_architectures(module)

        loader.exec_module = exec_module
        return spec


def _route_architectures(registry: ModuleType) -> None:
    """Puts the classes of :data:`MODELS_PACKAGE` into ``registry.ModelRegistry``. If they fail to import, SGLang keeps
    its own classes and the failure is logged, unless this process serves ``--kv-compress``, which it stops.

    Raises:
        RuntimeError if the classes fail to import and the published server arguments enable compression.
    """
    try:
        classes = registry.import_model_classes(MODELS_PACKAGE, strict=True)
    except Exception as error:
        message = (
            f"lightkv: the model classes of {MODELS_PACKAGE} failed to import ({type(error).__name__}: {error}); "
            "SGLang keeps its own classes, which cannot serve --kv-compress"
        )
        if _compression_requested():
            raise RuntimeError(message) from error
        logger.exception(message)
        return
    registry.ModelRegistry.models.update(classes)


def _compression_requested() -> bool:
    """Whether this process's published ``ServerArgs`` enable ``--kv-compress`` (False before publication)."""
    from sglang.srt.runtime_context import get_server_args

    try:
        return settings_of(get_server_args()).enabled
    except ValueError:
        return False


# --- layer-group pools -----------------------------------------------------------------------------------------


def _pools_hook(model_runner: object, *args: object, **kwargs: object) -> None:
    """Before ``ModelRunner._init_post_memory_pool_components``: replace the single KV pool the runner just
    allocated by layer-group pools of the same memory (under ``--kv-compress`` with grouped pools)."""
    settings = settings_of(model_runner.server_args)
    if settings.enabled and settings.grouped_pools:
        from lightkv_adapters.sglang.pools import install_pools

        install_pools(model_runner, settings.pool_ratios)


def _prefill_requests_hook(batch: object, *args: object, **kwargs: object) -> None:
    """Before ``ScheduleBatch.prepare_for_extend``: tell the layer-group pools which requests the rows it is
    about to allocate belong to (their plans size each group's slots)."""
    from lightkv_adapters.sglang.pools import LayerGroupCache

    cache = getattr(batch.req_to_token_pool, "_aux_cache", None)
    if isinstance(cache, LayerGroupCache):
        cache.expect(batch.reqs)


def _admission_hook(original: Callable, adder: object, req: object, *args: object, **kwargs: object) -> object:
    """Around ``PrefillAdder.add_one_req``: with layer-group pools a request is admitted only if every group has
    room for its planned prompt tokens and its decode budget, beyond the decode budget of the running requests
    and what this pass already admitted (a decode budget past a group's whole pool counts as that pool). A request
    whose prompt could never fit one group is aborted with the reason."""
    from lightkv_adapters.sglang.pools import admits, group_demand

    groups = getattr(adder.token_to_kv_pool_allocator, "groups", None)
    if groups is None:
        return original(adder, req, *args, **kwargs)
    from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS, AddReqResult

    reserved = getattr(adder, "_lightkv_reserved", None)
    if reserved is None:
        running = adder.running_batch.reqs if adder.running_batch is not None else []
        decode = int(sum(adder._get_running_request_total_token_offset(r) for r in running))
        reserved = adder._lightkv_reserved = [decode] * len(groups.allocators)
    aborting = getattr(req, "to_finish", None) is not None or req.finished_reason is not None
    max_new = (
        0 if aborting else min(max(req.sampling_params.max_new_tokens - len(req.output_ids), 0), CLIP_MAX_NEW_TOKENS)
    )
    prompt = group_demand(groups, req, 0)
    sizes = [allocator.size for allocator in groups.allocators]
    too_big = [g + 1 for g, (need, size) in enumerate(zip(prompt, sizes, strict=True)) if need > size]
    if too_big and not aborting:
        # SGLang's own aborts replace the prompt by a stub at the next pass, which this hook then admits.
        req.set_finish_with_abort(
            f"lightkv: the prompt needs {prompt} KV slots in layer groups 1.. but groups {too_big} hold only "
            f"{sizes}; raise --kv-compress-pool-ratios for them"
        )
        return AddReqResult.CONTINUE
    # A decode budget past a group's whole pool is clipped to it, as SGLang clips generation to the empty pool;
    # decoding past the free slots then retracts (the decode-capacity check asks every group).
    demand = [min(need + max_new, size) for need, size in zip(prompt, sizes, strict=True)]
    if not admits(groups, demand, reserved):
        return AddReqResult.NO_TOKEN
    admitted = len(adder.can_run_list)
    result = original(adder, req, *args, **kwargs)
    if len(adder.can_run_list) > admitted:
        reserved[:] = [held + need for held, need in zip(reserved, demand, strict=True)]
    return result


def _pool_check_hook(result: tuple, checker: object, *args: object, **kwargs: object) -> tuple:
    """After ``SchedulerInvariantChecker._check_all_pools``: the layer-group pools' own conservation check
    (every slot free or held by exactly one row) joins the scheduler's leak report."""
    cache = getattr(checker.req_to_token_pool, "_aux_cache", None)
    leaks = getattr(cache, "leaks", None)
    if leaks is None:
        return result
    problems = leaks()
    has_leak, messages = result
    return has_leak or bool(problems), [*messages, *problems]


#: ``(target, hook, kind)`` of the layer-group pools; each hook does nothing unless the pools are installed.
POOL_HOOKS = (
    (
        "sglang.srt.model_executor.model_runner.ModelRunner._init_post_memory_pool_components",
        _pools_hook,
        HookType.BEFORE,
    ),
    ("sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend", _prefill_requests_hook, HookType.BEFORE),
    ("sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req", _admission_hook, HookType.AROUND),
    (
        "sglang.srt.managers.scheduler_components.invariant_checker.SchedulerInvariantChecker._check_all_pools",
        _pool_check_hook,
        HookType.AFTER,
    ),
)
