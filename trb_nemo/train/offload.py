"""Phase memory: tensors a phase of the step does not use wait in host memory.

A step decodes (rollout; evaluation decodes too), scores with the teacher and trains. The
student's optimizer state and gradient buffers are idle while it decodes
(``optim.offload_during_rollout``), the teacher's weights while the student trains
(``model.offload_teacher_during_training``). :class:`HostOffload` is the one mechanism for both;
:class:`PhaseMemory` says which set is where in which phase (the Trainer calls it between the
stages of :meth:`~trb_nemo.train.trainer.Trainer.step`).

The mechanism works on storages: each distinct storage behind the given tensors is copied byte
for byte to host memory and resized to 0 bytes, which frees it (on CUDA the caching allocator's
blocks are handed back with ``empty_cache``); restoring resizes it and copies the bytes back.
The host memory of a set is one flat buffer (:class:`HostBuffer`), each storage at its own
aligned offset, allocated at the set's first offload and reused at every later one (again only
if the set outgrew it: the student's Adam moments appear at its first optimizer step). On CUDA
the buffer is page-locked with ``cudaHostRegister`` at exactly its size, so the copies are
asynchronous DMA; pinned tensors from torch's caching host allocator would each be rounded up to
a power of two and never returned to the system (15-25 GB locked per rank for the teacher and
the optimizer state). Every tensor that views the storage (a parameter's ``main_grad`` in the
DDP gradient buffer, the distributed optimizer's shards, tied weights) stays the same Python
object with the same shape, and holds the same bits again after the restore: the round trip is
exact. While a storage is offloaded its tensors must not be read (torch does not check: on CPU
such a read is a segfault); the guards below turn the uses we know of into one clear error.

Why not Megatron-Core's own calls (0.19): ``MegatronOptimizer.offload_to_cpu`` moves only
tensors that are ``is_cuda`` (on CPU it does nothing, so nothing is released there), and it
moves every parameter the optimizer holds, which with fp32 weights is the student's weight
itself (``FP32Optimizer``) or a view into the DDP weight buffer (``DistributedOptimizer``'s
fp32 shards): the weights the student decodes with would go to the host, or a view would be
replaced by a detached copy. Its copies are blocking and unpinned. ``DDP.offload_grad_buffers``
does release storages like this module, but drops the gradients (``restore_grad_buffers``
zeroes them: not a round trip) and synchronizes CUDA unconditionally (it fails on CPU unless
told not to). One storage-level mechanism covers the optimizer, the gradients and the teacher.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch

HOST_ALIGNMENT = 512
"""Byte alignment of each storage's place in a :class:`HostBuffer` (DMA-friendly; the waste is
under 512 bytes per storage)."""


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over the whole storage (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(
        storage, 0, (storage.nbytes(),), (1,))


def _offsets(sizes: list[int]) -> tuple[list[int], int]:
    """Each size's offset in a buffer holding them in order, every offset a multiple of
    HOST_ALIGNMENT, and the buffer's size."""
    offsets, end = [], 0
    for n in sizes:
        offsets.append(end)
        end += -(-n // HOST_ALIGNMENT) * HOST_ALIGNMENT
    return offsets, end


class HostBuffer:
    """One flat uint8 host tensor of ``nbytes``, page-locked when ``pin`` (CUDA) with
    ``cudaHostRegister`` of exactly its size (unregistered when this object goes), plain host
    memory otherwise. Falls back to pageable memory, with one warning, where the system refuses
    to lock that much (``ulimit -l``): the copies then run synchronously, still exact."""

    def __init__(self, nbytes: int, pin: bool):
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, device="cpu")
        self.pinned = False
        if pin and nbytes:
            cudart = torch.cuda.cudart()
            err = cudart.cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)  # 0: default flags
            self.pinned = err == cudart.cudaError.success
            if not self.pinned:
                warnings.warn(f"trb_nemo: cannot page-lock {nbytes / 2**30:.1f} GiB of host "
                              f"memory for offloading ({err}); using pageable memory (slower "
                              "copies; raise the locked-memory limit, ulimit -l)", stacklevel=3)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel()

    def __del__(self):
        if getattr(self, "pinned", False):  # before the memory itself is freed
            self.pinned = False
            try:
                torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            except Exception:  # noqa: BLE001 - at interpreter exit CUDA may be gone already
                pass


class HostOffload:
    """A set of device storages parked in host memory and brought back bit-identically.

    ``offload(tensors, keep)`` parks every distinct storage (by data pointer) behind ``tensors``
    that is not behind one of ``keep`` and is not empty; ``restore()`` brings them back. Both are
    idempotent and no-ops when disabled. No collectives; on CUDA one stream synchronization
    each (the copies are issued non-blocking on the current stream and waited for before a
    storage is freed or used). The host side is one :class:`HostBuffer` per set (``buffer``),
    allocated at the first offload, sized to the set's bytes with each storage aligned, kept
    while the set is resident and reused by the next offload (``allocations`` counts how many
    were made: a new one only when the set outgrew the last). Pinned on CUDA; on a CPU-only
    machine the host is the same memory: the buffer is plain, and the storages are still
    copied, released and restored, so the mechanism runs (and is tested) there as on a GPU.
    """

    def __init__(self, what: str, key: str, enabled: bool = True):
        self.what = what
        """What is parked, for errors (``the teacher's weights``)."""
        self.key = key
        """The config key that asked for it (named in the errors)."""
        self.enabled = enabled
        self._parked: list[tuple[torch.UntypedStorage, torch.Tensor]] = []
        self.offloaded = False
        self.buffer: HostBuffer | None = None
        """The set's host memory (None before the first offload)."""
        self.allocations = 0

    def _buffer(self, nbytes: int, pin: bool) -> torch.Tensor:
        """The host buffer, of at least ``nbytes``: the one allocated before when it is large
        enough (and pinned as asked), else a new one (the old one freed first)."""
        if self.buffer is None or self.buffer.nbytes < nbytes:
            self.buffer = None  # freed (and unregistered) before the next one is made
            self.buffer = HostBuffer(nbytes, pin)
            self.allocations += 1
        return self.buffer.tensor

    @torch.no_grad()
    def offload(self, tensors: Iterable[torch.Tensor], keep: Iterable[torch.Tensor] = ()) -> None:
        if not self.enabled or self.offloaded:
            return
        kept = {t.untyped_storage().data_ptr() for t in keep}
        storages: dict[int, torch.UntypedStorage] = {}
        for t in tensors:
            s = t.untyped_storage()
            if s.nbytes() > 0 and s.data_ptr() not in kept:
                storages.setdefault(s.data_ptr(), s)
        parked = list(storages.values())
        cuda = any(s.device.type == "cuda" for s in parked)
        offsets, total = _offsets([s.nbytes() for s in parked])
        host = self._buffer(total, pin=cuda)
        for s, at in zip(parked, offsets, strict=True):
            src = _bytes_of(s)
            dst = host[at: at + src.numel()]
            dst.copy_(src, non_blocking=src.is_cuda)
            self._parked.append((s, dst))
        if cuda:
            torch.cuda.current_stream().synchronize()  # the bytes are on the host before the free
        for s, _ in self._parked:
            s.resize_(0)
        if cuda:
            torch.cuda.empty_cache()
        self.offloaded = True

    @torch.no_grad()
    def restore(self) -> None:
        if not self.offloaded:
            return
        cuda = False
        for s, host in self._parked:
            s.resize_(host.numel())
            dst = _bytes_of(s)
            cuda |= dst.is_cuda
            dst.copy_(host, non_blocking=dst.is_cuda)
        if cuda:
            torch.cuda.current_stream().synchronize()  # in place before the buffer is reused
        self._parked = []
        self.offloaded = False

    @property
    def parked_bytes(self) -> int:
        """Bytes now in host memory (0 when resident)."""
        return sum(host.numel() for _, host in self._parked)

    def require_resident(self, use: str) -> None:
        """Raise (one line) if the set is offloaded: ``use`` would read freed memory."""
        if self.offloaded:
            raise RuntimeError(f"{use} while {self.what} are offloaded to host memory "
                               f"({self.key}); restore them first")


def _guard_forward(module: torch.nn.Module, offload: HostOffload) -> None:
    """Running ``module`` while ``offload`` holds its weights raises instead of reading freed
    memory: forward pre-hooks on the module (Megatron's forward: the scoring pass), on its
    embedding and on its first layer's input norm (the first thing the rollout's cached forward,
    :func:`trb_nemo.rollout.kv_cache.stage_forward`, runs on the first and on a later pipeline
    stage). One Python check per forward, none per op."""
    layers = getattr(getattr(module, "decoder", None), "layers", None)
    firsts = [module, getattr(module, "embedding", None),
              layers[0].input_layernorm if layers else None]
    for first in firsts:
        if first is not None:
            first.register_forward_pre_hook(
                lambda *_: offload.require_resident("the teacher's forward"))


class PhaseMemory:
    """Where the student's training state and the teacher's weights are, phase by phase.

    ===========================  ===================================  =========================
    call (Trainer)               student optimizer state + grads      teacher weights
                                 (``optim.offload_during_rollout``)   (``model.offload_teacher_
                                                                      during_training``)
    ===========================  ===================================  =========================
    :meth:`before_decoding`      host                                 device if the policy runs
                                                                      the teacher, else as is
    :meth:`before_scoring`       as is                                device
    :meth:`before_training`      device                               host (as is when the
                                                                      step streams it)
    :meth:`before_saving`        device                               as is
    :meth:`restore_all`          device                               device
    ===========================  ===================================  =========================

    With both options on, a step is: optimizer state out, rollout (the teacher in first when
    the behavior policy runs it), teacher in, scoring pass, teacher out, optimizer state in,
    train_step. Evaluation decodes with the optimizer state out and the teacher as it is
    (pass@1 decodes with the student alone); a checkpoint save first brings the optimizer state
    back, and the next rollout sends it out again. A call is a no-op for a set that is already
    where the call wants it, or whose option is off. The teacher's forward is guarded
    (:func:`_guard_forward`), the optimizer step by :meth:`StudentTraining.set_lr
    <trb_nemo.train.optimizer.StudentTraining.set_lr>`.
    """

    def __init__(self, training, teacher: torch.nn.Module | None, teacher_offload: bool):
        self.student = training
        """The :class:`~trb_nemo.train.optimizer.StudentTraining` (its ``state_memory`` is
        enabled by ``optim.offload_during_rollout``)."""
        self.teacher = teacher
        self.teacher_memory = HostOffload("the teacher's weights",
                                          "model.offload_teacher_during_training",
                                          enabled=teacher_offload and teacher is not None)
        if self.teacher_memory.enabled:
            _guard_forward(teacher, self.teacher_memory)

    def before_decoding(self, needs_teacher: bool) -> None:
        self.student.offload_state()
        if needs_teacher:
            self.teacher_memory.restore()

    def before_scoring(self) -> None:
        self.teacher_memory.restore()

    def before_training(self, keep_teacher: bool = False) -> None:
        """``keep_teacher``: the step runs the teacher (a streamed teacher, ``loss.kind=full``
        or Veto under PP = 1), so it stays where it is."""
        if self.teacher_memory.enabled and not keep_teacher:
            self.teacher_memory.offload(module_tensors(self.teacher))
        self.student.restore_state()

    def before_saving(self) -> None:
        self.student.restore_state()

    def restore_all(self) -> None:
        self.student.restore_state()
        self.teacher_memory.restore()


def module_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """A module's parameters and buffers (what :class:`HostOffload` parks of a network)."""
    return [*module.parameters(), *module.buffers()]
