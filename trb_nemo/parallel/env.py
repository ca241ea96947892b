"""Who launched this process, read from the environment (no torch.distributed, no Megatron)."""

from __future__ import annotations

import os

from trb_nemo.config.schema import ConfigError


def launched_externally() -> bool:
    """True under torchrun (RANK/WORLD_SIZE set) or inside a Slurm task (SLURM_PROCID)."""
    return ("RANK" in os.environ and "WORLD_SIZE" in os.environ) or "SLURM_PROCID" in os.environ


def external_world_size() -> int:
    """Ranks of a torchrun or srun launch, readable before the process group exists."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)


def env_from_slurm() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK from srun's variables (one task per rank)."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise ConfigError("MASTER_ADDR", "an srun launch needs MASTER_ADDR and MASTER_PORT exported "
                          "(the sbatch script of `trb-nemo launch slurm` sets them)")
