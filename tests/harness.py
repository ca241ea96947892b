"""Run a test body on N ranks spawned from inside pytest (no torchrun per test).

``spawn(fn, world_size, *args)`` starts ``world_size`` fresh processes, joins them into a gloo
process group (NCCL under the gpu marker when asked), runs ``fn(*args)`` on each and returns
the per-rank results. A hang or a failure kills every rank's whole process group: the test
fails with the rank's traceback instead of hanging CI.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from trb_nemo.parallel.spawn import free_port, run_local_ranks  # noqa: F401 - re-exported

DEFAULT_TIMEOUT_S = 240.0


def _with_group(backend: str, fn, args):
    dist.init_process_group(backend=backend, init_method="env://")
    if backend == "nccl":
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    return fn(*args)


def spawn(fn, world_size: int, *args, backend: str = "gloo", timeout_s: float = DEFAULT_TIMEOUT_S):
    """fn(*args) on world_size ranks inside an initialized process group; results by rank."""
    return run_local_ranks(_with_group, world_size, (backend, fn, args), timeout_s=timeout_s)


def spawn_bare(fn, world_size: int, *args, timeout_s: float = DEFAULT_TIMEOUT_S):
    """fn(*args) on world_size ranks with only the env:// variables set (fn joins the group)."""
    return run_local_ranks(fn, world_size, args, timeout_s=timeout_s)
