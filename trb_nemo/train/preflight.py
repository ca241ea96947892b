"""Checks that need the machine or the disk, run before any rank starts or model is built.

The config schema checks values; this checks that what the values point at exists and can
run here. Each failure is a ConfigError naming the key to change.
"""

from __future__ import annotations

import importlib.util

import torch

from trb_nemo.config.schema import ConfigError, TrainConfig
from trb_nemo.data.prompts import build_source
from trb_nemo.models.resolve import resolve_models
from trb_nemo.parallel.env import external_world_size, launched_externally


def preflight(cfg: TrainConfig) -> TrainConfig:
    """Raise ConfigError for anything that would fail later, after expensive start-up; return
    ``cfg`` with every model's architecture resolved (HF config.json or checkpoint metadata)."""
    if cfg.model.transformer_impl == "transformer_engine" and importlib.util.find_spec(
        "transformer_engine"
    ) is None:
        raise ConfigError("model.transformer_impl", "transformer_engine is not installed here (it "
                          "needs a GPU image); use model.transformer_impl=local model.fp8=null")
    if not torch.cuda.is_available():
        if cfg.parallel.backend == "nccl":
            raise ConfigError("parallel.backend", "nccl needs CUDA; use parallel.backend=gloo "
                              "(or parallel=cpu_tp2)")
        if cfg.parallel.sequence_parallel:
            raise ConfigError("parallel.sequence_parallel", "needs Transformer Engine or Apex "
                              "norms (GPU); set parallel.sequence_parallel=false on CPU")
    _check_batch_layout(cfg)
    cfg = resolve_models(cfg)
    build_source(cfg)  # reads and checks every prompt
    return cfg


def _check_batch_layout(cfg: TrainConfig) -> None:
    """Prompts split evenly over data-parallel ranks and sequences over microbatches."""
    world = external_world_size() if launched_externally() else cfg.parallel.local_world_size
    dp = max(1, world // cfg.parallel.model_parallel_size)
    o = cfg.optim
    if o.prompts_per_step % dp:
        raise ConfigError("optim.prompts_per_step", f"must be a multiple of the {dp} data-parallel "
                          f"ranks, got {o.prompts_per_step}")
    sequences = o.prompts_per_step // dp * cfg.rollout.num_rollouts_per_prompt
    if sequences % o.micro_batch_size:
        raise ConfigError("optim.micro_batch_size", f"must divide the {sequences} sequences per "
                          f"data-parallel rank and step, got {o.micro_batch_size}")
