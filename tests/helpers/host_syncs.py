"""Counting the host synchronisations a piece of code would make on a GPU, on a CPU.

On a GPU, the host waits for the device whenever Python needs a value that the device computes: ``.item()``,
``int()``/``bool()`` of a tensor, ``.tolist()``, ``.cpu()``, ``nonzero``, boolean-mask indexing, ``unique``,
``repeat_interleave`` without ``output_size``, ... On a CPU nothing waits, so :class:`HostSyncCounter` tracks
which tensors *would* live on the device: the ones the test marks (the inputs a caller hands over on its GPU) and
everything computed from them (taint propagates through every op, views and in-place writes included). A
data-dependent read of a marked tensor counts as one sync; ``.cpu()`` (or ``.to("cpu")``) of one gives host data.

Host data (tensors built from vision spans, configs) costs nothing to read until it moves to the device. Here every
device is the CPU, so the counter follows the ``torch.device`` objects themselves: ``.device`` of a marked tensor
answers one remembered object, and a factory (``torch.zeros``, ``torch.arange``, ...) or ``.to(...)`` given that
object (or a marked tensor) makes device data; ``.device`` of host data answers a different ``cpu`` device.
"""

from __future__ import annotations

import contextlib
import functools
import traceback
from collections import Counter
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten

#: Ops whose output size or value the host must read from the device.
DATA_DEPENDENT_OPS = {
    aten._local_scalar_dense.default: "item",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.repeat_interleave.Tensor: "repeat_interleave",
    aten.equal.default: "equal",
    aten.is_nonzero.default: "bool",
}

#: Where the counter looks for the line that made a read.
PROJECT_PACKAGES = ("lightkv_core", "lightkv_adapters", "adapters/")

#: Python-level reads of tensor data that do not go through the dispatcher on CPU tensors.
PYTHON_READS = ("tolist", "numpy", "cpu")
#: Factory functions whose result is device data when given ``device=`` a ``torch.device``.
FACTORIES = ("zeros", "ones", "full", "empty", "arange", "tensor", "as_tensor", "linspace", "randperm")


class HostSyncCounter(TorchDispatchMode):
    """Counts data-dependent host reads of device tensors (see the module docstring).

    Use as ``with HostSyncCounter() as counter: counter.mark(x, y); run(x, y)``; ``counter.count`` is the total,
    ``counter.reads`` a :class:`Counter` by kind (``"nonzero"``, ``"cpu"``, ...) and ``counter.sites`` one by the
    innermost project line (``path:line``) that made the read.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()
        self._device_ids: set[int] = set()
        self._alive: list[torch.Tensor] = []  # keeps marked tensors alive so that their ids are never reused

    @property
    def count(self) -> int:
        return sum(self.reads.values())

    def record(self, kind: str) -> None:
        self.reads[kind] += 1
        stack = [f for f in traceback.extract_stack() if "host_syncs" not in f.filename]
        ours = [f for f in stack if any(package in f.filename for package in PROJECT_PACKAGES)]
        frame = ours[-1] if ours else next((f for f in reversed(stack) if "/torch/" not in f.filename), None)
        site = f"{frame.filename.split('/')[-1]}:{frame.lineno}" if frame else "?"
        self.sites[f"{site} {kind}"] += 1

    def mark(self, *tensors: torch.Tensor | None) -> None:
        """Mark tensors as living on the device."""
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                self._device_ids.add(id(tensor))
                self._alive.append(tensor)

    def unmark(self, tensor: torch.Tensor) -> None:
        """Treat ``tensor`` as host data (a copy the host already holds)."""
        self._device_ids.discard(id(tensor))

    def on_device(self, tensor: object) -> bool:
        return isinstance(tensor, torch.Tensor) and id(tensor) in self._device_ids

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        device_input = any(self.on_device(t) for t in inputs)
        if device_input:
            kind = DATA_DEPENDENT_OPS.get(func)
            if kind == "repeat_interleave" and kwargs.get("output_size") is not None:
                kind = None
            if kind is None and func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
                indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
                if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                    kind = "boolean index"
            if kind is not None:
                self.record(kind)
        out = func(*args, **(kwargs or {}))
        if device_input:
            self.mark(*[t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)])
            if func._schema.is_mutable or func.name().endswith("_"):
                self.mark(*inputs[:1])
        return out

    def __enter__(self) -> HostSyncCounter:
        self._patches = contextlib.ExitStack()
        self._patches.enter_context(_python_reads(self))
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._patches.close()


@contextlib.contextmanager
def _python_reads(counter: HostSyncCounter) -> Iterator[None]:
    """Count ``tolist``/``numpy``/``cpu`` (and ``.to("cpu")``) of device tensors, and follow the device objects
    (see the module docstring), while the counter is active."""
    patched = (*PYTHON_READS, "to", "device")
    own = {name: torch.Tensor.__dict__[name] for name in patched if name in torch.Tensor.__dict__}
    originals = {name: getattr(torch.Tensor, name) for name in PYTHON_READS}
    original_to = torch.Tensor.to
    original_factories = {name: getattr(torch, name) for name in FACTORIES}
    the_device = torch.device("cpu")

    def device(self) -> torch.device:
        return the_device if counter.on_device(self) else torch.device("cpu")

    def names_device(value: object) -> bool:
        return value is the_device or counter.on_device(value)

    def to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if isinstance(target, str) and torch.device(target).type == "cpu" and counter.on_device(self):
            counter.record("cpu")
            copy = original_to(self, *args, **kwargs).clone()
            counter.unmark(copy)
            return copy
        result = original_to(self, *args, **kwargs)
        if names_device(target) and not counter.on_device(self):
            result = result.clone() if result is self else result  # the device copy, not the host original
            counter.mark(result)
        return result

    def factory(original):
        @functools.wraps(original)
        def make(*args, **kwargs):
            result = original(*args, **kwargs)
            if names_device(kwargs.get("device")):
                counter.mark(result)
            return result

        return make

    def wrap(name: str, original):
        @functools.wraps(original)
        def read(self, *args, **kwargs):
            if counter.on_device(self):
                counter.record(name)
                if name == "cpu":  # a host copy: a new tensor that is host data
                    copy = original(self, *args, **kwargs).clone()
                    counter.unmark(copy)
                    return copy
            return original(self, *args, **kwargs)

        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    torch.Tensor.to = to
    torch.Tensor.device = property(device)
    for name, original in original_factories.items():
        setattr(torch, name, factory(original))
    try:
        yield
    finally:
        for name in patched:
            if name in own:
                setattr(torch.Tensor, name, own[name])
            else:
                delattr(torch.Tensor, name)
        for name, original in original_factories.items():
            setattr(torch, name, original)
