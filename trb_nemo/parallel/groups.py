"""Process groups for a run: torch.distributed, Megatron's parallel_state, seeds.

This module and the rest of ``trb_nemo/parallel/`` are the only users of
``megatron.core.parallel_state``; everything else receives groups as arguments.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from trb_nemo.config.schema import ConfigError, ParallelConfig
from trb_nemo.ops import fused
from trb_nemo.parallel.cpu_support import apply_cpu_support
from trb_nemo.parallel.env import env_from_slurm


def backend_for(parallel: ParallelConfig) -> str:
    if parallel.backend != "auto":
        return parallel.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def initialize(parallel: ParallelConfig, seed: int) -> None:
    """Join the job's process group and build the TP/PP/DP groups. Idempotent per process.

    Reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (torchrun, srun or the local spawner). On a
    machine without CUDA it first applies the CPU support patches and uses gloo. Seeds Megatron's
    model-parallel RNG tracker from ``seed`` and then the default generators with ``seed``, and
    sets how the vocab-parallel ops run (``parallel.fused_ops``).
    """
    env_from_slurm()
    if not torch.cuda.is_available():
        apply_cpu_support()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend_for(parallel),
            init_method="env://",
            timeout=datetime.timedelta(minutes=parallel.timeout_minutes),
        )
    world = dist.get_world_size()
    if world % parallel.model_parallel_size != 0:
        raise ConfigError("parallel", f"world size {world} is not a multiple of TP x PP = "
                          f"{parallel.model_parallel_size}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    fused.set_mode(parallel.fused_ops)


def destroy() -> None:
    """Tear down Megatron's groups and the default process group."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def tensor_group() -> dist.ProcessGroup:
    """The tensor-parallel group: the ``vocab_group`` of the vocab-parallel ops."""
    return parallel_state.get_tensor_model_parallel_group()


def tensor_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def pipeline_rank() -> int:
    return parallel_state.get_pipeline_model_parallel_rank()


def pipeline_group() -> dist.ProcessGroup:
    return parallel_state.get_pipeline_model_parallel_group()


def data_group() -> dist.ProcessGroup:
    return parallel_state.get_data_parallel_group()


def data_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def data_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def is_first_stage() -> bool:
    return parallel_state.is_pipeline_first_stage()


def is_last_stage() -> bool:
    return parallel_state.is_pipeline_last_stage()


def broadcast_from_last_stage(x: torch.Tensor) -> torch.Tensor:
    """In place: every pipeline stage gets the last stage's ``x`` (1 broadcast; none at PP=1)."""
    pg = pipeline_group()
    size = dist.get_world_size(pg)
    if size > 1:
        dist.broadcast(x, src=dist.get_global_rank(pg, size - 1), group=pg)
    return x


def data_parallel_mean(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the data-parallel ranks (1 all-reduce of [n]; none at DP=1)."""
    if data_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=data_group())
    return dict(zip(keys, (t / data_size()).tolist(), strict=True))
