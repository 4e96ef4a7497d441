"""Choosing between a Triton kernel and its plain-PyTorch fallback, and shared launch checks."""

from __future__ import annotations

import math
import numbers
import os

import torch

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where triton is not installed
    TRITON_AVAILABLE = False

BACKENDS = ("auto", "triton", "torch")

#: Launch option of every kernel: Triton fuses ``a * b + c`` into FMAs by default and warns (3.9) that the default
#: flips in 3.10; the kernels were written, checked and tuned with fusion on, so every launch asks for it.
FP_FUSION = True
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors (for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_backend(op: str, backend: object) -> None:
    """Raises ValueError naming ``op`` unless ``backend`` is one of :data:`BACKENDS`."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")


def choose_backend(backend: str, device: torch.device, op: str) -> str:
    """Resolve ``backend`` for an op whose tensors live on ``device``.

    ``"auto"`` picks Triton for CUDA tensors (or any tensor under ``TRITON_INTERPRET=1``) when Triton
    is installed, and the PyTorch fallback otherwise. ``"triton"`` is an error where it cannot run.
    """
    check_backend(op, backend)
    triton_runs_here = TRITON_AVAILABLE and (device.type == "cuda" or interpreting())
    if backend == "auto":
        return "triton" if triton_runs_here else "torch"
    if backend == "triton" and not triton_runs_here:
        why = "triton is not installed" if not TRITON_AVAILABLE else f"tensors are on {device} (set TRITON_INTERPRET=1)"
        raise RuntimeError(f"{op}: the Triton backend cannot run here: {why}")
    return backend


def check_same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; returns it."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"{op}: tensors must be on one device, got {devices}")
    return first


def check_index_lists(op: str, x: torch.Tensor, **lists: torch.Tensor) -> None:
    """Index lists all on ``x``'s device or all on the host: lists planned on the host are checked there without
    waiting for the device, and the launch copies them over."""
    devices = {name: t.device for name, t in lists.items()}
    if len(set(devices.values())) > 1 or not set(devices.values()) <= {x.device, torch.device("cpu")}:
        raise ValueError(f"{op}: index lists must be all on {x.device} or all on the CPU, got {devices}")


def check_float(op: str, name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float16, bfloat16 or float32, got {tensor.dtype}")


def check_attention(op: str, q: torch.Tensor, k: torch.Tensor) -> None:
    """``q`` ``(B, H, S, d)`` and ``k`` ``(B, Hk, S, d)`` float tensors of one dtype, with ``H, d >= 1`` and
    ``H`` a multiple of ``Hk >= 1``."""
    check_float(op, "q", q)
    check_float(op, "k", k)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{op}: q must be (B, H, S, d) and k (B, Hk, S, d), got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, heads, seq, head_dim = q.shape
    if heads < 1 or head_dim < 1:
        raise ValueError(f"{op}: q needs at least one head of size >= 1, got shape {tuple(q.shape)}")
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq, head_dim):
        raise ValueError(f"{op}: k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, length or head size")
    if k.shape[1] < 1 or heads % k.shape[1] != 0:
        raise ValueError(f"{op}: {heads} query heads are not a multiple of {k.shape[1]} key heads")
    if q.dtype != k.dtype:
        raise TypeError(f"{op}: q and k must share a dtype, got {q.dtype} and {k.dtype}")


def check_scale(op: str, scale: object) -> float:
    """A softmax logit scale as a float: a finite real number ``> 0`` (a negative scale reverses the attention, 0
    makes it uniform, NaN/Inf poison it).

    Raises:
        TypeError if ``scale`` is not a real number (a bool is not); ValueError naming it otherwise.
    """
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{op}: scale must be a real number, got {scale!r}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{op}: scale must be a finite number > 0, got {scale!r}")
    return float(scale)


def softmax_scale(op: str, scale: object, head_dim: int) -> float:
    """``scale`` checked by :func:`check_scale`, or ``1 / sqrt(head_dim)`` for ``None``."""
    return 1.0 / math.sqrt(head_dim) if scale is None else check_scale(op, scale)


def check_index(op: str, name: str, tensor: torch.Tensor, ndim: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: {name} must be an int32/int64 tensor, got {tensor.dtype}")
    if tensor.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimension(s), got shape {tuple(tensor.shape)}")


def check_rows(op: str, name: str, rows: torch.Tensor, num_rows: int, lowest: int = 0) -> None:
    """Every entry of ``rows`` in ``[lowest, num_rows)``."""
    if rows.numel() and (int(rows.min()) < lowest or int(rows.max()) >= num_rows):
        raise ValueError(f"{op}: {name} out of range: entries must lie in [{lowest}, {num_rows})")


def check_csr(op: str, name: str, offsets: torch.Tensor, num_items: int) -> None:
    """CSR pointers: start at 0, never fall, end at ``num_items``."""
    if int(offsets[0]) != 0 or int(offsets[-1]) != num_items or bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"{op}: {name} must rise from 0 to {num_items}")


# How a kernel multiplies tiles (the DOT_MODE constexpr): products of fp16/bf16 values are exact in
# float32, so every mode is float32 math with float32 accumulation.
DOT_NATIVE = 0  # fp16/bf16 tiles straight into tl.dot (tensor cores)
DOT_IEEE = 1  # fp32 tiles, full-precision (no TF32)
DOT_UPCAST = 2  # bf16 under TRITON_INTERPRET: its interpreter mis-reads bf16 tl.dot, so upcast first


def dot_mode(dtype: torch.dtype) -> int:
    """The DOT_MODE for tiles of ``dtype``."""
    if dtype == torch.float32:
        return DOT_IEEE
    if dtype == torch.bfloat16 and interpreting():
        return DOT_UPCAST
    return DOT_NATIVE


if TRITON_AVAILABLE:

    @triton.jit
    def dot_f32(a, b, DOT_MODE: tl.constexpr):
        """``a @ b`` accumulated in float32 (see DOT_MODE)."""
        if DOT_MODE == 0:
            result = tl.dot(a, b)
        elif DOT_MODE == 1:
            result = tl.dot(a, b, input_precision="ieee")
        else:
            result = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return result


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
