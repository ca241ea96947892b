"""Process groups for a run: torch.distributed, Megatron's parallel_state, seeds.

This module and the rest of ``trb_nemo/parallel/`` are the only users of
``megatron.core.parallel_state``; everything else receives groups as arguments.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection

from trb_nemo.config.schema import ConfigError, ParallelConfig
from trb_nemo.ops import fused
from trb_nemo.parallel import comm
from trb_nemo.parallel.cpu_support import apply_cpu_support
from trb_nemo.parallel.env import env_from_slurm


def backend_for(parallel: ParallelConfig) -> str:
    if parallel.backend != "auto":
        return parallel.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def initialize(parallel: ParallelConfig, seed: int) -> ParallelGroups:
    """Join the job's process group, build the TP/PP/DP groups and return them (the one
    :class:`ParallelGroups` of the run, to pass on). Idempotent per process.

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
    return ParallelGroups.from_megatron()


def destroy() -> None:
    """Tear down Megatron's groups and the default process group."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups of one network layout, built once by :func:`initialize` and passed
    to whatever communicates: the network builders, the decoder, the schedule, the rollout, the
    loss. Nothing outside ``trb_nemo/parallel/`` fetches groups from a global.

    ``tensor`` is the ``vocab_group`` of the vocab-parallel ops; ``pipeline`` carries the
    decoder's hidden states and the chosen tokens; ``data`` splits the prompts. Ranks and sizes
    are within each group. ``megatron`` is the same layout as Megatron-Core's
    ``ProcessGroupCollection`` (given to GPTModel).
    """

    tensor: dist.ProcessGroup
    pipeline: dist.ProcessGroup
    data: dist.ProcessGroup
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    megatron: ProcessGroupCollection = field(repr=False)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @classmethod
    def from_megatron(cls) -> ParallelGroups:
        """The layout Megatron's ``parallel_state`` was initialized with."""
        return cls(
            tensor=parallel_state.get_tensor_model_parallel_group(),
            pipeline=parallel_state.get_pipeline_model_parallel_group(),
            data=parallel_state.get_data_parallel_group(),
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            tp_size=parallel_state.get_tensor_model_parallel_world_size(),
            pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
            pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(),
            megatron=ProcessGroupCollection.use_mpu_process_groups(
                required_pgs=["tp", "pp", "mp", "cp", "tp_cp", "embd", "pos_embd", "dp",
                              "dp_cp"]),
        )


def broadcast_from_last_stage(x: torch.Tensor, pg: ParallelGroups) -> torch.Tensor:
    """In place: every pipeline stage gets the last stage's ``x`` (1 broadcast; none at PP=1)."""
    return comm.broadcast(x, src=pg.pp_size - 1, group=pg.pipeline)


def data_parallel_mean(values: dict[str, float], pg: ParallelGroups) -> dict[str, float]:
    """Each value averaged over the data-parallel ranks (1 all-reduce of [n]; none at DP=1)."""
    if pg.dp_size == 1:
        return values
    keys = sorted(values)
    t = comm.all_reduce(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64),
                        group=pg.data)
    return dict(zip(keys, (t / pg.dp_size).tolist(), strict=True))
