"""Count the operations that make a GPU host wait (host syncs) in a block of CPU code.

On a CPU every op is synchronous, so a host sync cannot be timed here; what can be counted is
the op that would be one on a GPU:

* at the dispatcher (:class:`torch.utils._python_dispatch.TorchDispatchMode`):
  ``_local_scalar_dense`` (``.item()``, ``bool(t)``, ``int(t)``, ``float(t)``; under
  inference mode they dispatch as ``item`` and ``is_nonzero``), ``nonzero``,
  ``masked_select``, indexing or index-writing with a boolean mask (a nonzero inside),
  ``repeat_interleave`` without ``output_size``, ``unique``;
* at the Python API (:class:`torch.overrides.TorchFunctionMode`): ``Tensor.tolist()`` (reads
  the data on the host without dispatching an op) and ``torch.tensor`` / ``torch.as_tensor`` of
  Python data (a list or a number: a host-to-device copy on a GPU).

``SyncCounter.events`` lists them by name in order; ``len(counter)`` is their number.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "unique", "_unique",
             "_unique2", "unique_consecutive", "unique_dim"}
_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl_"}


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if not self.counter.counting:
            pass
        elif name in _SYNC_OPS:
            self.counter.events.append(name)
        elif name in _INDEXING and _bool_index(args):
            self.counter.events.append(f"{name}[bool mask]")
        elif name == "repeat_interleave" and kwargs.get("output_size") is None and (
                len(args) < 4 or args[3] is None) and isinstance(args[0], torch.Tensor) and (
                len(args) > 1 and isinstance(args[1], torch.Tensor) or len(args) == 1):
            self.counter.events.append("repeat_interleave without output_size")
        return func(*args, **kwargs)


def _python_data(data) -> bool:
    return not isinstance(data, torch.Tensor)


class _Function(TorchFunctionMode):
    def __init__(self, counter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.counter.counting:
            pass
        elif func is torch.Tensor.tolist:
            self.counter.events.append("tolist")
        elif func in (torch.tensor, torch.as_tensor) and args and _python_data(args[0]):
            self.counter.events.append(f"{func.__name__}(python data)")
        return func(*args, **kwargs)


class SyncCounter:
    """``with SyncCounter() as c: ...``; then ``c.events`` (module docstring). ``paused()``
    stops counting inside it (a test's own reads)."""

    def __init__(self):
        self.events: list[str] = []
        self.counting = True
        self._modes = None

    @contextlib.contextmanager
    def paused(self):
        was, self.counting = self.counting, False
        try:
            yield
        finally:
            self.counting = was

    def __len__(self) -> int:
        return len(self.events)

    def __enter__(self):
        self._modes = (_Function(self), _Dispatch(self))
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False
