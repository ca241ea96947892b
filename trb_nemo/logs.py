"""Rank-aware printing and the silencing of third-party start-up noise.

Rank 0 prints; the other ranks stay quiet. Megatron-Core warns on import that Apex and
Transformer Engine are absent (expected on CPU) and that GPTModel is deprecated in favor of
HybridModel; those lines carry no information for our users and are filtered.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

_NOISE = (
    r".*(Apex|Transformer Engine).*(is|are) not installed.*",
    r".*No CUDA runtime is found.*",
    r".*full scope is deprecated.*",  # TransformerConfig's cuda-graph default, unused here
    r".*deprecating ShardedTensor.*",  # dist_checkpointing's torch_dist writer
    r".*MimoModelConfig is experimental.*",  # imported by Megatron, unused here
    r".*torch\.distributed\.\w+_tensor` is deprecated.*",  # torch's renames; gloo lacks the new names
    r".*argument order of load has been changed.*",  # torch.distributed.checkpoint, via Megatron
    r".*assuming the intent is to load in a single process.*",  # its no-planner load path
    r".*\.grad attribute of a Tensor that is not a leaf.*",  # Megatron's optimizer, harmless
)
_CPU_NOISE = (r".*CUDA_DEVICE_MAX_CONNECTIONS.*",)  # a GPU stream setting


def global_rank() -> int:
    """Rank from the environment (valid before the process group exists)."""
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def quiet_third_party() -> None:
    """Filter the known start-up warnings and Megatron's per-rank info logs."""
    import torch

    for pattern in _NOISE + (() if torch.cuda.is_available() else _CPU_NOISE):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("megatron").setLevel(logging.ERROR)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def print0(*args, **kwargs) -> None:
    """print() on global rank 0 only, flushed."""
    if global_rank() == 0:
        print(*args, **kwargs, file=kwargs.pop("file", sys.stdout), flush=True)
