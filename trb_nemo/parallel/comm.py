"""The one home of ``torch.distributed`` calls outside the vocab-parallel ops.

Under NCCL every tensor of a collective must live on the current CUDA device; under gloo on the
CPU. Each helper here moves its tensor to the **group's communication device**
(:func:`comm_device`) and hands the result back on the **caller's device**, so a caller never
has to know the backend: a CPU flag all-reduced under NCCL, or a CUDA tensor under gloo, both
work. No copy is made when the tensor already lives on the communication device.

``group=None`` is the world. Ranks given as ``src``/``dst`` are ranks *within* ``group``.
Collectives are synchronous; each helper's docstring says what it communicates.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_rank() -> int:
    """This process's rank in the world (0 when no process group exists)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def global_rank(group: dist.ProcessGroup | None, rank_in_group: int) -> int:
    """The world rank of ``group``'s member ``rank_in_group``."""
    return rank_in_group if group is None else dist.get_global_rank(group, rank_in_group)


def comm_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where ``group``'s collectives need their tensors: the current CUDA device under NCCL,
    the CPU otherwise (gloo)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_comm(t: torch.Tensor, group) -> torch.Tensor:
    return t.to(comm_device(group)).contiguous()


def all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None = None, op: str = "sum"
               ) -> torch.Tensor:
    """``op`` (sum | max | min) of ``t`` over ``group``; a new tensor on ``t``'s device (``t`` is
    left unchanged). 1 all-reduce of t's shape; none when the group has one rank."""
    if group_size(group) == 1:
        return t.clone()
    buf = _to_comm(t, group)
    if buf is t:
        buf = t.clone()
    dist.all_reduce(buf, op=_OPS[op], group=group)
    return buf.to(t.device)


def broadcast(t: torch.Tensor, src: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Member ``src``'s ``t`` on every member, written into ``t`` (in place) and returned.
    Every rank passes a tensor of the same shape and dtype. 1 broadcast; none at one rank."""
    if group_size(group) == 1:
        return t
    buf = _to_comm(t, group)
    dist.broadcast(buf, src=global_rank(group, src), group=group)
    if buf is not t:
        t.copy_(buf)
    return t


def all_gather(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> list[torch.Tensor]:
    """Every member's ``t`` (same shape on all), in group-rank order, on ``t``'s device.
    1 all-gather."""
    if group_size(group) == 1:
        return [t.clone()]
    buf = _to_comm(t, group)
    parts = [torch.empty_like(buf) for _ in range(group_size(group))]
    dist.all_gather(parts, buf, group=group)
    return [p.to(t.device) for p in parts]


def send(t: torch.Tensor, dst: int, group: dist.ProcessGroup) -> None:
    """Point-to-point send of ``t`` to member ``dst`` of ``group`` (blocking)."""
    dist.send(_to_comm(t, group), dst=global_rank(group, dst), group=group)


def recv(shape, dtype: torch.dtype, src: int, group: dist.ProcessGroup,
         device: torch.device) -> torch.Tensor:
    """A tensor of ``shape``/``dtype`` from member ``src`` of ``group``, returned on ``device``."""
    buf = torch.empty(shape, dtype=dtype, device=comm_device(group))
    dist.recv(buf, src=global_rank(group, src), group=group)
    return buf.to(device)


def barrier(group: dist.ProcessGroup | None = None) -> None:
    """Wait for every member of ``group`` (no-op without a process group). Under NCCL the
    barrier runs on the current device (``device_ids``), so it never guesses one."""
    if not is_initialized():
        return
    if dist.get_backend(group) == "nccl":
        dist.barrier(group=group, device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier(group=group)
