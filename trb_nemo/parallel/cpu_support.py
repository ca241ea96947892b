"""Run Megatron-Core on a CPU with gloo: a small set of patches, applied only when CUDA is absent.

Megatron-Core has no CPU mode: it calls ``torch.cuda.current_device()``, allocates with
``device="cuda"``, keeps its RNG tracker on the CUDA generators and checks ``Tensor.type()``
strings. Each patch below maps one of those to the CPU and carries its reason in one line.
They are process-global, idempotent, and :func:`apply_cpu_support` refuses to touch anything
when ``torch.cuda.is_available()`` (on a GPU nothing is patched and NCCL is used).

Contract: call once per process after ``import torch`` and before building any Megatron model,
optimizer or pipeline schedule. :func:`trb_nemo.parallel.groups.initialize` does this.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch.overrides import TorchFunctionMode

_applied = False
_device_mode: TorchFunctionMode | None = None


def cpu_support_active() -> bool:
    """True once the patches are in place in this process."""
    return _applied


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device="cuda"`` to ``"cpu"`` and drops ``pin_memory`` in every torch call.

    Needed by the pipeline schedules (``torch.zeros([], device="cuda")``), the optimizer, the
    grad scaler and clip_grads, which allocate on CUDA explicitly.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)
        if func in (torch.Tensor.to, torch.Tensor.cuda) and args:
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


class _WallClockEvent:
    """Stand-in for ``torch.cuda.Event``: records wall-clock time (inference timing code)."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._t = None

    def record(self, stream=None):
        self._t = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _WallClockEvent) -> float:
        return (end._t - self._t) * 1000.0


class _DummyStream:
    """Stand-in for a CUDA stream: CPU work is synchronous, so waits are no-ops."""

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _WallClockEvent()

    def synchronize(self):
        pass


def _cpu_rng_get(device=None, *args, **kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_rng_set(new_state, device=None, *args, **kwargs) -> None:
    torch.set_rng_state(new_state)


class _IgnoreCpuRngWarning(logging.Filter):
    # The tracker warns when the CPU RNG moved inside fork(); on CPU the tracked generator IS the
    # CPU generator, so it always moves when dropout runs.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def apply_cpu_support() -> bool:
    """Patch torch and Megatron-Core so Megatron runs on the CPU. Returns True if applied.

    No-op (returns False) when CUDA is available. Safe to call more than once.
    """
    global _applied, _device_mode
    if torch.cuda.is_available():
        return False
    if _applied:
        return True

    from megatron.core.tensor_parallel import random as mcore_random

    cuda = torch.cuda
    # 1. GlobalMemoryBuffer, TP mappings and layers allocate on torch.cuda.current_device().
    cuda.current_device = lambda: "cpu"
    # 2. The RNG tracker (model_parallel_cuda_manual_seed, fork() around attention/dropout) keeps
    #    CUDA generator states; on CPU the tracked generator is the CPU default generator.
    cuda.get_rng_state = cuda.random.get_rng_state = _cpu_rng_get
    cuda.set_rng_state = cuda.random.set_rng_state = _cpu_rng_set
    # (torch.manual_seed itself calls cuda.manual_seed_all: seed the CPU generator directly.)
    cuda.manual_seed = cuda.random.manual_seed = torch.default_generator.manual_seed
    cuda.manual_seed_all = cuda.random.manual_seed_all = lambda seed: None
    mcore_random._get_cuda_rng_state = _cpu_rng_get
    mcore_random._set_cuda_rng_state = _cpu_rng_set
    logging.getLogger(mcore_random.__name__).addFilter(_IgnoreCpuRngWarning())
    # 3. Tied embeddings with PP>1 move the shared weight with weight.data.cuda().
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    # 4. Synchronization and cache calls have nothing to do on CPU.
    cuda.synchronize = lambda *args, **kwargs: None
    cuda.empty_cache = lambda: None
    # 5. clip_grads and the optimizer assert param.grad.type() == 'torch.cuda.FloatTensor'.
    original_type = torch.Tensor.type

    def _type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original_type(self)
            # (the device mode may route this call through _type again: rename only once)
            if self.device.type == "cpu" and not name.startswith("torch.cuda."):
                return name.replace("torch.", "torch.cuda.", 1)
            return name
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = _type
    # 6. Inference timing creates torch.cuda.Event(enable_timing=True).
    cuda.Event = _WallClockEvent
    # 7. DDP's start_grad_sync and overlap code ask for the current/default stream.
    cuda.current_stream = cuda.default_stream = lambda *args, **kwargs: _DummyStream()
    cuda.Stream = lambda *args, **kwargs: _DummyStream()
    cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    # 8. Pipeline schedules, optimizer and grad scaler allocate with device="cuda" explicitly.
    _device_mode = _CudaToCpuMode()
    _device_mode.__enter__()

    _applied = True
    return True


@contextlib.contextmanager
def device_mode_suspended():
    """Run a block without patch 8 (a no-op where the patches are not applied, as on a GPU).

    The device mode sees every torch call, which costs a Python round trip per op: in the
    rollout engine's per-token loop that was more than half the CPU time. Code inside must
    not allocate with ``device="cuda"`` explicitly (the decode path does not: it allocates
    on the device of the data).
    """
    if _device_mode is None:
        yield
        return
    # take it out of torch's function-mode stack wherever it sits: modes entered after it (a
    # test's counters) stay active, in their order
    stack = [torch._C._pop_torch_function_stack()
             for _ in range(torch._C._len_torch_function_stack())][::-1]  # bottom first
    for mode in stack:
        if mode is not _device_mode:
            torch._C._push_on_torch_function_stack(mode)
    try:
        yield
    finally:
        above = [torch._C._pop_torch_function_stack()
                 for _ in range(torch._C._len_torch_function_stack())][::-1]
        for mode in stack:
            torch._C._push_on_torch_function_stack(mode)
        for mode in above[len(stack) - 1:]:  # modes entered inside the block, if any
            torch._C._push_on_torch_function_stack(mode)
