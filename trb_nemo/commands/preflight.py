"""Checks that need the machine or the disk, run before any rank starts or model is built.

The config schema checks values; this checks that what the values point at exists and can
run here. Each failure is a ConfigError naming the key to change.

Last, the run's folders: the run folder and ``checkpoint.dir`` are created and must take a file;
then the checkpoint to resume from is chosen (the newest intact one, see
:func:`trb_nemo.train.checkpoint.choose_resume`) and the settings that define the run are
compared with the config saved in it (:func:`check_config_change`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from trb_nemo.config.schema import ConfigError, TrainConfig
from trb_nemo.data.prompts import build_source
from trb_nemo.logs import global_rank
from trb_nemo.models.folders import MODEL_META
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
    """A ``model.<role>.checkpoint`` with a manifest must have every file at its size (cheap: no
    checksums, a teacher is read at every start); one without (older saves, the shipped toy
    models) is used as it is."""
    for role in ("student", "teacher"):
        spec = getattr(cfg.model, role)
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


# ------------------------------------------------------------------ settings that define the run

RUN_DEFINING = ("model.student.", "model.teacher", "model.fp8", "model.precision",
                "model.init_seed", "data.", "loss.", "rollout.", "trb.", "optim.", "eval.", "seed")
"""Dotted-key prefixes of the settings that decide what a run is: which networks (files and
architecture) in which precision, which prompts and held-out problems, the loss, the behavior
policy and its schedule (``trb.*``, ``rollout.*``), the optimization problem, the evaluation
protocol behind the report's pass@1 (``eval.num_problems`` also sets the held-out split) and
every seed. A resume must keep them, unless ``checkpoint.allow_config_change``."""
MAY_CHANGE = ("model.student.name", "model.teacher.name", "optim.max_steps",
              "optim.micro_batch_size", "eval.interval", "optim.offload_during_rollout")
"""Exceptions: labels, the run's length, how a step is split into microbatches (the same sums),
how often pass@1 is measured and where the optimizer state waits while the student decodes
(bit-exact either way). Everything outside RUN_DEFINING may change too: the parallel
layout (resume across layouts is supported), ``model.transformer_impl`` (same math, another
kernel), logging, checkpointing, the launcher."""
_SHOWN = 6


def _defines_run(key: str) -> bool:
    return key.startswith(RUN_DEFINING) and key not in MAY_CHANGE


def config_differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old, new) for every run-defining setting that differs. A key only one side
    has (the schema gained or lost it between versions) is not compared."""
    out = []
    for k, v in new.items():
        key = f"{prefix}{k}"
        if k not in old:
            continue
        if isinstance(v, dict) and isinstance(old[k], dict):
            out += config_differences(old[k], v, key + ".")
        elif old[k] != v and _defines_run(key):
            out.append((key, old[k], v))
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 48 else text[:45] + "..."


def _as_dict(yaml_text: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(yaml_text))


def check_config_change(cfg: TrainConfig, folder: Path) -> list[tuple[str, object, object]]:
    """Compare the run-defining settings with the config saved in checkpoint ``folder``. A
    difference stops the run (ConfigError listing them), or, with
    ``checkpoint.allow_config_change``, is appended to ``<run folder>/config_changes.jsonl`` (global
    rank 0) and announced in one line. A checkpoint saved without its config is not compared."""
    from trb_nemo.config.compose import composed_yaml
    from trb_nemo.train.checkpoint import portable_yaml
    from trb_nemo.train.run_dir import CONFIG_FILE

    saved = folder / CONFIG_FILE
    if not saved.is_file():
        return []
    try:
        old = _as_dict(saved.read_text())
    except Exception as e:  # noqa: BLE001 - any parse failure means the same thing here
        raise ConfigError("checkpoint.dir", f"{str(saved)!r} is unreadable ({type(e).__name__}); "
                          "set checkpoint.resume=false to start over") from None
    diffs = config_differences(old, _as_dict(portable_yaml(composed_yaml(cfg))))
    if not diffs:
        return []
    listed = ", ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in diffs[:_SHOWN])
    if len(diffs) > _SHOWN:
        listed += f" (and {len(diffs) - _SHOWN} more)"
    run = RunFolder.of(cfg)
    if not cfg.checkpoint.allow_config_change:
        raise ConfigError("checkpoint.allow_config_change", f"is false, and resuming {folder} "
                          f"with other settings than it was trained with: {listed}. Use the "
                          "checkpoint's values, start a new run (another logging.run_name), or "
                          "set checkpoint.allow_config_change=true to continue with the change "
                          f"recorded in {run.config_changes}")
    if global_rank() == 0:
        step = json.loads((folder / MODEL_META).read_text()).get("step")
        run.record_config_change({
            "step": step, "checkpoint": folder.name,
            "changes": {k: [a, b] for k, a, b in diffs}})
        print(f"trb-nemo: resuming {folder.name} with changed settings "
              f"(checkpoint.allow_config_change=true): {listed}; recorded in "
              f"{run.config_changes}", file=sys.stderr, flush=True)
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
