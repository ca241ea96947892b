"""Checks that need the machine or the disk, run before any rank starts or model is built.

The config schema checks values; this checks that what the values point at exists and can
run here. Each failure is a ConfigError naming the key to change.
"""

from __future__ import annotations

import importlib.util
import warnings

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
    check_local_attention(cfg)
    build_source(cfg)  # reads and checks every prompt
    return cfg


LOCAL_ATTENTION_WARN_TOKENS = 4096
"""Above this context the local attention's [b, heads, S, S] scores are worth a warning."""


def local_attention_bytes(cfg: TrainConfig) -> int:
    """Bytes of one layer's attention scores under ``model.transformer_impl=local`` at the full
    context S = data.max_prompt_length + rollout.max_new_tokens: the fp32 scores and the
    probabilities kept for the backward, [micro_batch_size, heads / TP, S, S] each, for the
    network with the most heads."""
    s = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    specs = [m for m in (cfg.model.student, cfg.model.teacher) if m is not None]
    heads = max(m.num_attention_heads for m in specs) // cfg.parallel.tensor_model_parallel_size
    return 2 * 4 * cfg.optim.micro_batch_size * heads * s * s


def check_local_attention(cfg: TrainConfig, gpu_bytes: int | None = None) -> None:
    """On a GPU (``gpu_bytes`` None = this machine's; nothing to check without CUDA), refuse a
    local-spec run whose attention scores alone take half the GPU, and warn in one line above
    LOCAL_ATTENTION_WARN_TOKENS of context (Transformer Engine's fused attention never
    materializes them)."""
    if cfg.model.transformer_impl != "local":
        return
    if gpu_bytes is None:
        if not torch.cuda.is_available():
            return
        gpu_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    context = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    need = local_attention_bytes(cfg)
    fix = ("use model.transformer_impl=transformer_engine (fused attention, no S x S scores) or "
           "lower optim.micro_batch_size")
    if need > gpu_bytes // 2:
        raise ConfigError("model.transformer_impl", f"local attention materializes "
                          f"{need / 2**30:.1f} GiB of [b, heads, S, S] scores per layer at "
                          f"S={context} (GPU: {gpu_bytes / 2**30:.0f} GiB); {fix}")
    if context > LOCAL_ATTENTION_WARN_TOKENS:
        warnings.warn(f"model.transformer_impl=local at S={context}: {need / 2**30:.1f} GiB of "
                      f"attention scores per layer; {fix}", stacklevel=2)


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
