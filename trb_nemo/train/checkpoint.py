"""Training checkpoints: student weights, optimizer, step, RNG states, schedule and data position.

``<dir>/step_<N>/`` is one checkpoint after N completed optimizer steps, written atomically by
:func:`megatron_io.save_checkpoint` (a folder exists under its final name only when complete).
Sharded (dist_checkpointing): ``model`` (reshardable across TP/PP) and ``optimizer`` (the
distributed optimizer in the ``dp_reshardable`` format). Per rank: the CPU/CUDA generators,
Megatron's model-parallel RNG tracker, Python's ``random`` and ``progress`` (what the trainer
needs to continue: data position, schedule position, counters). The LR and eps schedules are
functions of the step, so the step is their position.

Resuming on the same layout reproduces an uninterrupted run bit for bit on CPU. Weights load on
any TP/PP layout; RNG states need the same world size (otherwise they are re-seeded from the
step, and the caller is told).
"""

from __future__ import annotations

import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import dist_checkpointing, tensor_parallel

from trb_nemo.config.schema import ModelSpec
from trb_nemo.models.megatron_io import (
    load_model,
    model_meta,
    rank_state_path,
    save_checkpoint,
)
from trb_nemo.models.resolve import MODEL_META, read_model_meta
from trb_nemo.parallel import comm
from trb_nemo.parallel.groups import ParallelGroups
from trb_nemo.train.optimizer import StudentTraining

_STEP = re.compile(r"step_(\d{7})")
_OPT_META = {"distrib_optim_sharding_type": "dp_reshardable"}


def step_folder(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP.fullmatch(p.name)
        if m and p.is_dir() and (p / MODEL_META).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _materialize_adam_state(optimizer) -> None:
    """Zero Adam moments and step 0 for parameters without state (a fresh optimizer), so the
    loading template has the saved structure; torch AdamW keeps a per-parameter ``step`` that
    Megatron's DistributedOptimizer.state_dict expects on the non-TE/Apex path."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = inner.optimizer
        for group in torch_opt.param_groups:
            for p in group["params"]:
                if len(torch_opt.state[p]) == 0:
                    torch_opt.state[p].update(exp_avg=torch.zeros_like(p.data),
                                              exp_avg_sq=torch.zeros_like(p.data),
                                              step=torch.zeros((), dtype=torch.float32))


def _restore_adam_steps(optimizer) -> None:
    """Give each parameter its own Adam ``step`` equal to the restored param-group step.

    On the non-TE/Apex path Megatron's DistributedOptimizer restores the step into the param
    groups but leaves the per-parameter ``step`` tensors of torch AdamW either shared between
    parameters (AdamW increments them in place: a shared one advances once per parameter) or
    overwritten from the loading template; either breaks Adam's bias correction after a resume.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = inner.optimizer
        for group in torch_opt.param_groups:
            if "step" not in group or group["step"] is None:
                continue
            for p in group["params"]:
                if p in torch_opt.state:
                    torch_opt.state[p]["step"] = torch.tensor(float(group["step"]))


def _sharded(training: StudentTraining, is_loading: bool) -> dict:
    if is_loading:
        _materialize_adam_state(training.optimizer)
    model_sd = training.model.module.sharded_state_dict()
    return {"model": model_sd,
            "optimizer": training.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                               metadata=_OPT_META)}


def _layout(training: StudentTraining, pg: ParallelGroups) -> dict:
    return {"tp": pg.tp_size, "pp": pg.pp_size, "dp": pg.dp_size,
            "distributed_optimizer": training.model.ddp_config.use_distributed_optimizer}


@dataclass
class Resumed:
    """What :func:`load_training` restored."""

    step: int
    progress: dict
    rng_restored: bool
    """Same world size: every rank got its own generators back."""
    optimizer_restored: bool
    """Same TP/PP layout and optimizer kind; otherwise Adam restarts from the loaded weights."""


def save_training(root: str | Path, step: int, training: StudentTraining, spec: ModelSpec,
                  progress: dict, keep_last: int, pg: ParallelGroups,
                  hf_config: dict | None = None) -> Path:
    """Collective: checkpoint after ``step`` completed steps; then keep the newest ``keep_last``."""
    folder = save_checkpoint(
        step_folder(root, step), _sharded(training, is_loading=False),
        model_meta(spec, hf_config, step=step, world_size=comm.world_size(),
                   layout=_layout(training, pg)),
        rank_state={"rng": _rng_state(), "progress": progress, "step": step},
    )
    if comm.world_rank() == 0:
        for _, old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    comm.barrier()
    return folder


@torch.no_grad()
def load_training(folder: str | Path, training: StudentTraining, pg: ParallelGroups) -> Resumed:
    """Restore weights, optimizer and RNG (collective; see the module docstring for what a
    layout change keeps). The optimizer's ``dp_reshardable`` format reshards only over DP."""
    meta = read_model_meta(str(folder), "checkpoint.dir")
    saved, now = meta.get("layout", {}), _layout(training, pg)
    same_model_layout = all(saved.get(k) == now[k] for k in ("tp", "pp", "distributed_optimizer"))
    if same_model_layout:
        state = dist_checkpointing.load(_sharded(training, is_loading=True), str(folder))
        training.model.module.load_state_dict(state["model"], strict=True)
        training.optimizer.load_state_dict(state["optimizer"])
        _restore_adam_steps(training.optimizer)
    else:
        load_model(folder, training.model.module)
        training.optimizer.reload_model_params()  # main (fp32) params from the loaded weights
    own = rank_state_path(folder, comm.world_rank())
    if meta.get("world_size") == comm.world_size() and own.is_file():
        rank_state = torch.load(own, weights_only=False)
        _set_rng_state(rank_state["rng"])
        return Resumed(meta["step"], rank_state["progress"], True, same_model_layout)
    rank0 = torch.load(rank_state_path(folder, 0), weights_only=False)
    return Resumed(meta["step"], rank0["progress"], False, same_model_layout)
