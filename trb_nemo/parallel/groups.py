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
    sets how the vocab-parallel ops run (``parallel.fused_ops``), the same way on every rank
    (:func:`agree_on_fused_kernels`). The device is ``LOCAL_RANK`` modulo the GPUs this process
    sees (a cluster may bind one GPU per task).
    """
    env_from_slurm()
    if not torch.cuda.is_available():
        apply_cpu_support()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
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
    agree_on_fused_kernels()
    _uneven["group"] = dist.new_group(
        backend="gloo", timeout=datetime.timedelta(minutes=parallel.uneven_phase_timeout_minutes))
    return ParallelGroups.from_megatron()


_uneven: dict = {"group": None}
"""The world as a gloo group with ``parallel.uneven_phase_timeout_minutes``: the barrier after a
phase whose length differs across ranks (:func:`wait_after_uneven_phase`)."""


def agree_on_fused_kernels() -> None:
    """Collective over the world (1 all-reduce(MIN) of [1]), at start-up: where this process
    would run the vocab-parallel kernels compiled, it compiles a probe kernel, and every rank
    runs them compiled only if every rank could; otherwise all run them eagerly (one warning).
    Ranks that chunk rows differently make different collectives and hang, so the choice must
    be the world's, not each process's (:mod:`trb_nemo.ops.fused`)."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    wanted = fused.is_fused(device)
    ok = torch.tensor([1 if not wanted or fused.compiles(device) else 0], dtype=torch.int64)
    agreed = int(comm.all_reduce(ok, op="min").item()) if comm.is_initialized() else int(ok)
    if wanted and not agreed:
        fused.set_mode("off")
        if comm.world_rank() == 0:
            import warnings

            warnings.warn("trb_nemo: a rank could not compile the fused op kernels, so every "
                          "rank runs them eagerly (parallel.fused_ops=off)", stacklevel=2)
    fused.agreed(wanted and bool(agreed))


def wait_after_uneven_phase() -> None:
    """Every rank waits here for the others after a phase whose length differs across ranks
    (rollout, evaluation), on a gloo group with ``parallel.uneven_phase_timeout_minutes``, so
    the next collective (NCCL, ``parallel.timeout_minutes``) starts with every rank present
    instead of timing out on the first one to finish. No-op without :func:`initialize`."""
    if _uneven["group"] is not None:
        comm.barrier(_uneven["group"])


def destroy() -> None:
    """Tear down Megatron's groups and the default process group."""
    _uneven["group"] = None
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
    model: dist.ProcessGroup
    """TP x PP: the ranks that decode one set of sequences in lockstep."""
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
            model=parallel_state.get_model_parallel_group(),
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
