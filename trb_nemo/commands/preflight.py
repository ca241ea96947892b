"""Checks that need the machine or the disk, run before any rank starts or model is built.

The config schema checks values; this checks that what the values point at exists and can
run here. Each failure is a ConfigError naming the key to change.

Last, the run's folders: the run folder and ``checkpoint.dir`` are created and must take a file;
then the checkpoint to resume from is chosen (the newest intact one, see
:func:`trb_nemo.train.checkpoint.choose_resume`) and the settings that define the run are
compared with the config saved in it (:func:`check_config_change`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from trb_nemo.config.schema import ConfigError, TrainConfig
from trb_nemo.data.prompts import build_source, data_fingerprint
from trb_nemo.logs import global_rank
from trb_nemo.models.megatron_io import verify_checkpoint
from trb_nemo.models.resolve import resolve_models
from trb_nemo.parallel.env import external_world_size, launched_externally
from trb_nemo.train.run_dir import RunFolder


def preflight(cfg: TrainConfig) -> TrainConfig:
    """Raise ConfigError for anything that would fail later, after expensive start-up; return
    ``cfg`` with every model's architecture resolved (HF config.json or checkpoint metadata)."""
    check_machine(cfg)
    _check_batch_layout(cfg)
    cfg = check_models(cfg)
    check_gpu_memory(cfg)
    source = build_source(cfg)  # reads and checks every prompt
    skipped = getattr(source, "skipped", [])
    if skipped and global_rank() == 0:
        print(f"trb-nemo: data.skip_long_prompts: left out {len(skipped)} prompt(s) longer than "
              f"{cfg.data.max_prompt_length} tokens (the first: {skipped[0]})", flush=True)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                            fingerprint=data_fingerprint(cfg)))
    RunFolder.of(cfg).check_writable()
    plan_resume(cfg)
    return cfg


def check_machine(cfg: TrainConfig) -> None:
    """This machine can run the configured implementation, backend and features: the
    installed packages and tools, CUDA or not."""
    check_te_version(cfg)
    check_compiler(cfg)
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
        if cfg.model.recompute_granularity is not None:
            # Megatron re-runs the layers in backward with CUDA RNG states and CUDA masks
            raise ConfigError("model.recompute_granularity", "activation recomputation runs on "
                              "CUDA only; set model.recompute_granularity=null on CPU")


TE_MIN_TENSORWISE = "2.2.0.dev0"
"""Transformer Engine from which Megatron-Core builds the tensorwise (current scaling) recipe."""


def installed_te_version() -> str | None:
    """Version of the importable Transformer Engine; None when absent (or it has no metadata).
    Read from the package metadata: importing TE would initialize CUDA."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is None:
        return None
    for dist in ("transformer_engine", "transformer_engine_torch"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_te_version(cfg: TrainConfig) -> None:
    """``model.fp8_recipe=tensorwise`` needs a Transformer Engine that Megatron-Core builds it
    with (an absent TE is refused by :func:`check_machine`)."""
    if cfg.model.fp8_recipe != "tensorwise":
        return
    te = installed_te_version()
    if te is not None and not _version_at_least(te, TE_MIN_TENSORWISE):
        raise ConfigError("model.fp8_recipe", f"tensorwise (current scaling) needs Transformer "
                          f"Engine >= 2.2, this one is {te}; use model.fp8_recipe=delayed or a "
                          "newer Transformer Engine")


def check_compiler(cfg: TrainConfig) -> None:
    """``parallel.fused_ops=on`` compiles kernels with a C++ compiler: one must be on PATH."""
    if cfg.parallel.fused_ops != "on":
        return
    compilers = [c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c]
    if not any(shutil.which(c) for c in compilers):
        raise ConfigError("parallel.fused_ops", "'on' compiles kernels with a C++ compiler and "
                          f"none is on PATH (looked for {', '.join(compilers)}); install one or "
                          "use auto/off")


def _version_at_least(version: str, minimum: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) >= Version(minimum)
    except InvalidVersion:
        return True  # an unreadable version: let Megatron-Core decide at build time


def check_gpu_memory(cfg: TrainConfig) -> None:
    """On CUDA: every phase's planned per-GPU peak (:mod:`trb_nemo.plan.memory`) fits
    ``parallel.gpu_memory_gb``, before any model loads."""
    if not torch.cuda.is_available():
        return
    from trb_nemo.plan.memory import check_config

    check_config(cfg, external_world_size() if launched_externally()
                 else cfg.parallel.local_world_size)


def check_models(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its networks resolved and checked (files, layout, intact checkpoints, the
    attention's memory); reads configuration files only, no weights."""
    cfg = resolve_models(cfg)
    _check_model_checkpoints(cfg)
    check_local_attention(cfg)
    return cfg


def _check_model_checkpoints(cfg: TrainConfig) -> None:
    """The weights each network loads are there: a ``model.<role>.checkpoint`` with a manifest
    must have every file at its size (cheap: no checksums, a teacher is read at every start;
    one without, older saves and the shipped toy models, is used as it is); a network read from
    ``model.<role>.hf_path`` alone needs its ``*.safetensors``."""
    from trb_nemo.models.hf_config import check_hf_weights

    for role in ("student", "teacher"):
        spec = getattr(cfg.model, role)
        if spec is not None and spec.checkpoint is None and spec.hf_path is not None:
            check_hf_weights(spec.hf_path, f"model.{role}.hf_path")
        if spec is not None and spec.checkpoint is not None:
            reason = verify_checkpoint(spec.checkpoint, checksums=False)
            if reason is not None:
                raise ConfigError(f"model.{role}.checkpoint", f"{spec.checkpoint!r} is damaged: "
                                  f"{reason}")


# --------------------------------------------------------------------------- the run's folders


def plan_resume(cfg: TrainConfig) -> Path | None:
    """Choose the checkpoint to resume from and check its config; hand the choice to the ranks.

    Global rank 0 verifies checksums (once per job: resume is rare and crc32 reads GB/s); other
    ranks of a torchrun/srun job, which run this too, check sizes only and take rank 0's choice
    at start-up. Damaged folders cost one warning line each (rank 0)."""
    from trb_nemo.train.checkpoint import choose_resume

    run = RunFolder.of(cfg)
    root = run.checkpoints
    folder = None
    if cfg.checkpoint.resume:
        rank0 = global_rank() == 0
        folder = choose_resume(root, checksums=rank0,
                               warn=(lambda line: print(line, file=sys.stderr, flush=True))
                               if rank0 else None)
        if folder is not None:
            check_config_change(cfg, folder)
    run.record_resume_choice(folder)
    return folder


def check_config_change(cfg: TrainConfig, folder: Path) -> list[tuple[str, object, object]]:
    """Compare the run-defining settings with the config saved in checkpoint ``folder``
    (:func:`~trb_nemo.train.run_dir.saved_config_differences`). The student's architecture and
    the vocabulary are fixed by the checkpoint: a change there stops the run whatever
    ``checkpoint.allow_config_change`` says. Another difference stops it unless
    ``checkpoint.allow_config_change``; then it is announced in one line, and the trainer records
    it in ``config_changes.jsonl`` once the checkpoint has loaded (a start that fails writes
    nothing). A checkpoint saved without its config is not compared."""
    from trb_nemo.config.compose import composed_yaml
    from trb_nemo.train.run_dir import fixed_by_checkpoint, listed, saved_config_differences

    diffs = saved_config_differences(folder, composed_yaml(cfg))
    if not diffs:
        return []
    run = RunFolder.of(cfg)
    fixed = [d for d in diffs if fixed_by_checkpoint(d[0])]
    if fixed:
        raise ConfigError("logging.run_name", f"{folder} holds a run of another network than "
                          f"this config's ({listed(fixed)}): its checkpoint cannot take these "
                          "settings. Start a new run (another logging.run_name or "
                          f"logging.output_dir), or move {run.path} away")
    if not cfg.checkpoint.allow_config_change:
        raise ConfigError("checkpoint.allow_config_change", f"is false, and resuming {folder} "
                          f"with other settings than it was trained with: {listed(diffs)}. Use "
                          "the checkpoint's values, start a new run (another logging.run_name), "
                          "or set checkpoint.allow_config_change=true to continue with the "
                          f"change recorded in {run.config_changes}")
    if global_rank() == 0:
        print(f"trb-nemo: resuming {folder.name} with changed settings "
              f"(checkpoint.allow_config_change=true): {listed(diffs)}; recorded in "
              f"{run.config_changes} once the run has resumed", file=sys.stderr, flush=True)
    return diffs


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
