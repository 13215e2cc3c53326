"""Counting, on a CPU, what a step's Python code would make a GPU wait for.

On a GPU the host waits whenever Python reads a device tensor's values (``item``,
``tolist``, ``bool``, ``int``, a data-dependent shape such as ``nonzero``) and whenever it
copies host data to the device synchronously (``torch.tensor(data, device=...)``, a
blocking ``.to(device)``). CUDA's sync debug mode counts these on a GPU; ``DeviceReads``
counts the same calls on a CPU engine, whose tensors all live in host memory, by tracking
which of them would be on the device:

- every tensor that existed before counting began is the engine's (weights, KV cache,
  logits): on the device;
- a tensor made from host data without a device (``torch.tensor(values)``) is a host
  tensor, as is whatever is computed from host tensors alone; a fresh ``torch.empty`` /
  ``arange`` holds nothing yet and takes the side of what it is combined with;
- anything computed from a device tensor is on the device, and so is every tensor a call
  mixes with one (an op writing its output in place); ``.to(device)`` of a host tensor is
  a copy to the device (a clone here).

The registered ops run as single calls, as the GPU's kernels do: what happens inside them
is the kernels' business (the CUDA sync-debug tests check the launchers).
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "numpy", "cpu",
          "equal", "allclose", "is_nonzero", "__array__", "__repr__", "__format__"}
#: output shapes that depend on the data: the host reads a count back
_DATA_SHAPED = {"nonzero", "masked_select", "unique", "unique_consecutive", "argwhere"}
_MAKES_FROM_DATA = {"tensor", "as_tensor", "from_numpy"}
_HOST, _DEVICE, _FRESH = "host", "device", "fresh"


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _side(t: torch.Tensor) -> str:
    return getattr(t, "_counted_side", _DEVICE)


def _mark(obj, side: str) -> None:
    for t in _tensors(obj):
        t._counted_side = side


class DeviceReads(TorchFunctionMode):
    """Within the block, ``reads`` lists (function name, kind) for every device read and
    every synchronous host-to-device copy, in order."""

    def __init__(self):
        super().__init__()
        self.reads: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        inputs = list(_tensors((args, kwargs)))
        sides = {_side(t) for t in inputs}
        on_device = _DEVICE in sides

        if name in _READS and on_device:
            self.reads.append((name, "read"))
        elif name in _DATA_SHAPED and on_device:
            self.reads.append((name, "data-dependent shape"))
        elif name == "__getitem__" and on_device and any(t.dtype == torch.bool for t in inputs[1:]):
            self.reads.append((name, "boolean mask"))

        if name == "to" and _moves(args[1:], kwargs) and not on_device:
            if not kwargs.get("non_blocking", False):
                self.reads.append((name, "blocking copy to the device"))
            result = args[0].clone()
            _mark(result, _DEVICE)
            return result
        result = func(*args, **kwargs)
        if not inputs and name in _MAKES_FROM_DATA:
            if kwargs.get("device") is not None:
                self.reads.append((name, "blocking copy to the device"))
                _mark(result, _DEVICE)
            else:
                _mark(result, _HOST)
        elif not inputs:
            _mark(result, _FRESH)
        elif on_device:
            _mark((args, kwargs, result), _DEVICE)  # an op writing into a fresh output
        elif _HOST in sides:
            _mark(result, _HOST)
        else:
            _mark(result, _FRESH)
        return result


def _moves(args, kwargs) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` names a device (not only a dtype)."""
    return any(isinstance(a, (torch.device, str)) for a in (*args, kwargs.get("device")))
