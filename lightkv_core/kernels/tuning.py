"""Launch configurations of the Triton kernels: defaults, the space ``lightkv autotune`` searches, and the
per-device cache of tuned configurations the kernels read at launch.

A *config* is a kernel's tile sizes (its ``tl.constexpr`` block parameters) plus ``num_warps`` and ``num_stages``;
each kernel has one :class:`TunableKernel` in :data:`KERNELS`, named ``"<module>.<kernel>"`` for the Triton kernel
``<kernel>_kernel`` of ``lightkv_core.kernels.<module>`` (``"window_match"``: ``window_match.window_match_kernel``).
Its default may differ per dtype (:attr:`TunableKernel.dtype_defaults`), so that no default spills registers on
any of :data:`TARGETS` (``lightkv autotune --compile-only``). Shape keys, the cache file and its errors:
``perf/README.md``, "Autotuning".

A cache that cannot be used (a file that is not a valid cache, ``LIGHTKV_CACHE_DIR`` naming a file) is a
:class:`TuningCacheError` where the cache is read or written on purpose (:func:`read_cache`, :func:`store_configs`,
``lightkv autotune``), and at a kernel launch (:func:`launch_config`) a :class:`TuningCacheWarning` naming the file,
once, after which the kernels launch with their defaults: a broken cache never stops inference.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lightkv_core.errors import UsageError

# The cache is one JSON file per device, <cache dir>/<device slug>.json (cache_path):
#     {"format": 1, "device": "NVIDIA H100 80GB HBM3", "triton": "3.4.0",
#      "kernels": {"scoring.column_lse": {"S=4096,T=128,H=32,d=128,dtype=float16":
#                                         {"config": {...}, "time_s": ..., "default_time_s": ...}}}}
CACHE_FORMAT = 1
LAUNCH_PARAMS = ("num_warps", "num_stages")
DTYPE_NAMES = ("float16", "bfloat16", "float32")
#: The NVIDIA targets every default is compiled for and checked on (lightkv_core.compile_check).
TARGETS = ("sm_80", "sm_90", "sm_100")


@dataclass(frozen=True)
class TunableKernel:
    """One Triton kernel's launch parameters.

    Attributes:
        name: ``"<module>.<kernel>"``, e.g. ``"scoring.column_lse"``.
        default: the config used when the cache has no entry for a shape.
        space: every value autotuning may pick, per parameter (the default's values included).
        key_dims: the dimensions of the shape key, in order.
        dtype_defaults: per dtype name, the parameters whose default differs for tiles of that dtype
            (:meth:`default_for`).
    """

    name: str
    default: dict[str, int]
    space: dict[str, tuple[int, ...]]
    key_dims: tuple[str, ...]
    dtype_defaults: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.default) != set(self.space):
            raise ValueError(f"{self.name}: default and space must name the same parameters")
        if not set(self.dtype_defaults) <= set(DTYPE_NAMES):
            raise ValueError(f"{self.name}: dtype defaults for {sorted(self.dtype_defaults)}, not all of {DTYPE_NAMES}")
        for config in (self.default, *self.dtype_defaults.values()):
            for param, value in config.items():
                if value not in self.space.get(param, ()):
                    space = self.space.get(param)
                    raise ValueError(f"{self.name}: default {param}={value} is not in its space {space}")

    def default_for(self, dtype: str) -> dict[str, int]:
        """The default config for tiles of ``dtype`` (a dtype name): :attr:`default`, updated with the dtype's
        :attr:`dtype_defaults`."""
        return {**self.default, **self.dtype_defaults.get(dtype, {})}

    def candidates(self) -> list[dict[str, int]]:
        """Every config of the space (the cartesian product of the parameter values)."""
        params = list(self.space)
        return [dict(zip(params, values, strict=True)) for values in itertools.product(*self.space.values())]

    def check(self, config: dict, where: str) -> dict[str, int]:
        """``config`` if it names exactly this kernel's parameters with values from its space; else ValueError."""
        if not isinstance(config, dict) or set(config) != set(self.space):
            got = sorted(config) if isinstance(config, dict) else type(config).__name__
            raise ValueError(f"{where}: {self.name} config must set {sorted(self.space)}, got {got}")
        for param, value in config.items():
            if value not in self.space[param]:
                raise ValueError(f"{where}: {self.name} {param}={value!r} is not one of {self.space[param]}")
        return dict(config)

    def key(self, **dims: int | str) -> str:
        """The shape key, e.g. ``"S=4096,T=128,H=32,d=128,dtype=float16"``."""
        if set(dims) != set(self.key_dims):
            raise ValueError(f"{self.name}: shape key needs {self.key_dims}, got {sorted(dims)}")
        return ",".join(f"{dim}={dims[dim]}" for dim in self.key_dims)


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two (at least 16): the token-count dimensions of shape keys."""
    return max(16, 1 << max(0, (int(n) - 1).bit_length()))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_key(key: str) -> dict[str, str]:
    """The dimensions of a shape key: ``"D=4096,dtype=float16"`` -> ``{"D": "4096", "dtype": "float16"}``."""
    return dict(item.split("=", 1) for item in key.split(","))


# The defaults launch as the kernels did before they were tunable (Triton's default 4 warps and 3 stages), except
# float32 tiles of the four matmul-like kernels: their tl.dot is IEEE float32 (no TF32, DOT_MODE), on CUDA cores,
# whose operands at those tiles spilled thousands of bytes on every target (README, "Compile check"). Their float32
# defaults hold half the tile or spread it over 8 warps instead: 37-84 registers and no spill on sm_80/90/100.
_WARPS = (4, 8)
_STAGES = (2, 3)

KERNELS: dict[str, TunableKernel] = {
    kernel.name: kernel
    for kernel in (
        TunableKernel(
            "scoring.column_lse",
            default={"BLOCK_S": 64, "BLOCK_T": 32, "SPLIT_S": 512, "num_warps": 4, "num_stages": 3},
            space={
                "BLOCK_S": (32, 64, 128),
                "BLOCK_T": (16, 32, 64, 128),
                "SPLIT_S": (256, 512, 1024, 2048),
                "num_warps": _WARPS,
                "num_stages": _STAGES,
            },
            key_dims=("S", "T", "H", "d", "dtype"),
            dtype_defaults={"float32": {"BLOCK_S": 32, "num_warps": 8}},
        ),
        TunableKernel(
            "scoring.row_sum",
            default={"BLOCK_S": 64, "BLOCK_T": 32, "HEADS_PER_PROGRAM": 8, "num_warps": 4, "num_stages": 3},
            space={
                "BLOCK_S": (16, 32, 64, 128),
                "BLOCK_T": (16, 32, 64, 128),
                "HEADS_PER_PROGRAM": (1, 2, 4, 8, 16),
                "num_warps": _WARPS,
                "num_stages": _STAGES,
            },
            key_dims=("S", "T", "H", "d", "dtype"),
            dtype_defaults={"float32": {"BLOCK_T": 16, "num_warps": 8}},
        ),
        TunableKernel(
            "window_match",
            # The kernel holds a BLOCK_A x BLOCK_D x BLOCK_B block of products (no tl.dot, see window_match).
            default={"BLOCK_A": 16, "BLOCK_B": 16, "BLOCK_D": 32, "num_warps": 4, "num_stages": 3},
            space={
                "BLOCK_A": (16, 32),
                "BLOCK_B": (16, 32, 64),
                "BLOCK_D": (8, 16, 32, 64),
                "num_warps": _WARPS,
                "num_stages": _STAGES,
            },
            key_dims=("window", "D", "dtype"),
        ),
        TunableKernel(
            "merge_compact",
            default={"BLOCK_D": 1024, "num_warps": 4, "num_stages": 3},
            space={"BLOCK_D": (16, 32, 64, 128, 256, 512, 1024, 2048), "num_warps": (1, 2, 4, 8), "num_stages": (1, 3)},
            key_dims=("D", "dtype"),
        ),
        TunableKernel(
            "attention_stats.row_lse",
            default={"BLOCK_Q": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
            space={"BLOCK_Q": (16, 32, 64, 128), "BLOCK_K": (32, 64, 128), "num_warps": _WARPS, "num_stages": _STAGES},
            key_dims=("Q", "S", "H", "d", "dtype"),
            dtype_defaults={"float32": {"BLOCK_Q": 16, "num_warps": 8}},
        ),
        TunableKernel(
            "attention_stats.column_sum",
            default={"BLOCK_Q": 64, "BLOCK_C": 64, "num_warps": 4, "num_stages": 3},
            space={
                "BLOCK_Q": (16, 32, 64, 128),
                "BLOCK_C": (16, 32, 64, 128),
                "num_warps": _WARPS,
                "num_stages": _STAGES,
            },
            key_dims=("Q", "C", "H", "d", "dtype"),
            dtype_defaults={"float32": {"BLOCK_Q": 32, "num_warps": 8}},
        ),
    )
}


def cache_dir() -> Path:
    """``$LIGHTKV_CACHE_DIR`` if set, else ``~/.cache/lightkv``."""
    configured = os.environ.get("LIGHTKV_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "lightkv"


def device_name(device: torch.device) -> str:
    """The name a device's configs are stored under: the CUDA device name, or ``"cpu"`` (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def cache_path(name: str) -> Path:
    """The cache file of the device called ``name``."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"
    return cache_dir() / f"{slug}.json"


class TuningCacheError(UsageError):
    """The tuning cache cannot be used: a file that is not a valid cache, or a cache folder that is a file or cannot
    be written. The message names the path and what to do; ``lightkv`` prints it as one ``lightkv: error:`` line."""


class TuningCacheWarning(UserWarning):
    """A kernel launch found the tuning cache unusable and launches with the default configs instead."""


# path -> (modification time, the checked content or the error message), so a launch re-reads only a changed file
_loaded: dict[Path, tuple[int, dict | str]] = {}
_warned: set[str] = set()
_REDO = "delete it or rerun lightkv autotune"


def _not_a_folder(folder: Path) -> TuningCacheError:
    """The error for a cache folder that a file stands in the place of (or of one of its parents)."""
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), folder)
    where = f"{folder} is a file" if blocker == folder else f"{folder} cannot be made: {blocker} is a file"
    return TuningCacheError(
        f"lightkv tuning cache folder {where}, not a folder; point LIGHTKV_CACHE_DIR at a folder or remove {blocker}"
    )


def read_cache(path: Path) -> dict:
    """The parsed, checked cache file at ``path`` (``{}`` if there is none); re-read when the file changes.

    Raises:
        TuningCacheError: the file is not a valid cache, or a file stands where its folder should be.
    """
    try:
        stamp = path.stat().st_mtime_ns
    except FileNotFoundError:
        return {}
    except NotADirectoryError:
        raise _not_a_folder(path.parent) from None
    except OSError as error:
        raise TuningCacheError(f"lightkv tuning cache {path} cannot be read ({error.strerror}); {_REDO}") from None
    cached = _loaded.get(path)
    if cached is None or cached[0] != stamp:
        try:
            cached = (stamp, _checked_cache(path))
        except TuningCacheError as error:
            cached = (stamp, str(error))
        _loaded[path] = cached
    if isinstance(cached[1], str):
        raise TuningCacheError(cached[1])
    return cached[1]


def _checked_cache(path: Path) -> dict:
    """The content of the cache file at ``path``, checked against :data:`KERNELS`; TuningCacheError otherwise."""

    def bad(problem: str) -> TuningCacheError:
        return TuningCacheError(f"lightkv tuning cache {path} {problem}; {_REDO}")

    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise bad("cannot be read (not UTF-8 text)") from None
    except OSError as error:
        raise bad(f"cannot be read ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise bad(f"cannot be read ({error})") from None
    if not isinstance(content, dict) or content.get("format") != CACHE_FORMAT:
        raise bad(f"is not format {CACHE_FORMAT}")
    kernels = content.get("kernels", {})
    if not isinstance(kernels, dict):
        raise bad("has no object 'kernels'")
    for kernel_name, entries in kernels.items():
        if kernel_name not in KERNELS:
            raise bad(f"names an unknown kernel {kernel_name!r} (known: {sorted(KERNELS)})")
        if not isinstance(entries, dict):
            raise bad(f"does not map {kernel_name}'s shape keys to entries")
        for key, entry in entries.items():
            if not isinstance(entry, dict) or "config" not in entry:
                raise bad(f"has no config for {kernel_name} [{key}]")
            try:
                KERNELS[kernel_name].check(entry["config"], f"[{key}]")
            except ValueError as error:
                raise bad(f"has a bad config: {error}") from None
    return content


def _launch_cache(path: Path) -> dict:
    """:func:`read_cache` for a kernel launch: an unusable cache is a :class:`TuningCacheWarning` (once per
    problem) and ``{}``, so the kernels launch with their defaults."""
    try:
        return read_cache(path)
    except TuningCacheError as error:
        message = f"{error}; until then the kernels launch with their default configs"
        if message not in _warned:
            _warned.add(message)
            warnings.warn(message, TuningCacheWarning, stacklevel=4)
        return {}


def launch_config(kernel: str, device: torch.device, **dims: int | str) -> dict[str, int]:
    """The config ``kernel`` launches with on ``device`` for a shape: the cached tuned one, else
    :func:`default_config` (also where the cache is unusable, with a :class:`TuningCacheWarning`)."""
    key = KERNELS[kernel].key(**dims)
    entry = _launch_cache(cache_path(device_name(device))).get("kernels", {}).get(kernel, {}).get(key)
    return dict(entry["config"]) if entry else default_config(kernel, dims)


def default_config(kernel: str, dims: dict[str, int | str]) -> dict[str, int]:
    """``kernel``'s default for the dtype of ``dims`` (a shape key's dimensions, :meth:`TunableKernel.default_for`),
    every tile clamped to the dimension it tiles (:func:`fit_tiles`)."""
    return fit_tiles(KERNELS[kernel].default_for(str(dims["dtype"])), dims)


# The shape-key dimension each tile parameter tiles: a tile larger than that dimension (rounded up to a power of
# two) would only mask lanes, so defaults are clamped to it and autotuning does not try larger ones.
TILED_DIMS = {
    "BLOCK_T": "T",
    "BLOCK_A": "window",
    "BLOCK_B": "window",
    "BLOCK_D": "D",
    "BLOCK_Q": "Q",
    "BLOCK_C": "C",
}


def fit_tiles(config: dict[str, int], dims: dict[str, int | str]) -> dict[str, int]:
    """``config`` with each tile no larger than the bucketed dimension it tiles (where the key has it)."""
    fitted = dict(config)
    for param, dim in TILED_DIMS.items():
        if param in fitted and dim in dims:
            fitted[param] = min(fitted[param], bucket(int(dims[dim])))
    return fitted


def writable_cache(name: str) -> Path:
    """The cache file of device ``name``, checked before tuning writes it: a valid cache or none, in a folder that
    can be created and written.

    Raises:
        TuningCacheError: naming the file or folder and what to do.
    """
    path = cache_path(name)
    read_cache(path)  # also refuses a file where the folder should be
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise TuningCacheError(
            f"lightkv tuning cache folder {folder} cannot be written ({error.strerror or error}); point "
            "LIGHTKV_CACHE_DIR at a folder you can write to"
        ) from None
    return path


def store_configs(name: str, triton_version: str, tuned: dict[str, dict[str, dict]]) -> Path:
    """Merge ``tuned`` (kernel -> shape key -> entry with a ``config``) into the cache file of device ``name``.

    Raises:
        TuningCacheError: the cache cannot be written (:func:`writable_cache`).
    """
    path = writable_cache(name)
    content = read_cache(path) or {"format": CACHE_FORMAT, "device": name, "kernels": {}}
    content = json.loads(json.dumps(content))  # a private copy to update
    content["triton"] = triton_version
    for kernel, entries in tuned.items():
        for key, entry in entries.items():
            KERNELS[kernel].check(entry["config"], f"tuned {kernel} [{key}]")
        content["kernels"].setdefault(kernel, {}).update(entries)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    temporary.replace(path)
    return path
