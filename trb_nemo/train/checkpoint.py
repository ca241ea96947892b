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

Which folder a run resumes from: :func:`choose_resume` walks the complete checkpoints newest
first and takes the first that :func:`~trb_nemo.models.megatron_io.verify_checkpoint` finds
intact, with one warning line per damaged folder skipped; it runs in the pre-flight, before any
rank starts, which hands its choice to the ranks
(:data:`~trb_nemo.train.run_dir.RESUME_ENV`); rank 0 then broadcasts
the folder, so every rank loads the same one (:func:`agreed_resume_folder`). Damaged folders are
never deleted: the run moves them aside as ``step_<N>.damaged`` before it can save over them.
Each checkpoint also holds the run's composed ``config.yaml``, which the pre-flight compares
with the resuming run's settings.

Megatron is imported inside the functions that need it: the pre-flight uses this module before
any rank starts, in a process that never builds a model.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trb_nemo.config.schema import ConfigError, ModelSpec
from trb_nemo.models.folders import (
    MODEL_META,
    STEP_FOLDER,
    complete_checkpoints,
    read_model_meta,
    step_folder,
)
from trb_nemo.models.megatron_io import (
    load_model,
    model_meta,
    rank_state_path,
    save_checkpoint,
    verify_checkpoint,
)
from trb_nemo.parallel import comm
from trb_nemo.train.run_dir import CONFIG_FILE, portable_yaml, recorded_resume_choice

if TYPE_CHECKING:
    from trb_nemo.parallel.groups import ParallelGroups
    from trb_nemo.train.optimizer import StudentTraining

_OPT_META = {"distrib_optim_sharding_type": "dp_reshardable"}


def latest_complete_step(root: str | Path) -> int | None:
    """The step of the newest complete checkpoint under ``root`` (None: none)."""
    found = complete_checkpoints(root)
    return found[-1][0] if found else None


def choose_resume(root: str | Path, checksums: bool = True,
                  warn: Callable[[str], None] | None = print) -> Path | None:
    """The newest complete checkpoint under ``root`` that is intact, or None when there is none
    at all. Each damaged folder skipped costs one ``warn`` line; when every complete checkpoint
    is damaged: ConfigError(checkpoint.dir), since starting over silently would throw the run
    away. A folder without a manifest (saved by an older trb-nemo) is trusted after the cheap
    structural checks: there is nothing to verify it against."""
    found = complete_checkpoints(root)
    damaged = []
    for _, folder in reversed(found):
        reason = verify_checkpoint(folder, checksums=checksums)
        if reason is None:
            for bad, why in damaged:
                if warn is not None:
                    warn(f"trb-nemo: checkpoint {bad} is damaged ({why}); resuming from "
                         f"{folder.name} (the damaged folder is kept as {bad.name}{DAMAGED})")
            return folder
        damaged.append((folder, reason))
    if damaged:
        listed = "; ".join(f"{f.name}: {why}" for f, why in damaged)
        raise ConfigError("checkpoint.dir", f"every checkpoint in {root} is damaged ({listed}); "
                          "nothing was deleted. Set checkpoint.resume=false to start over, or "
                          "checkpoint.dir to a folder with an intact checkpoint")
    return None


DAMAGED = ".damaged"
"""Suffix of a damaged checkpoint moved aside (kept for the user, never loaded)."""

def remove_unfinished_saves(root: str | Path) -> list[str]:
    """Delete ``step_*.tmp`` folders (saves a crash interrupted: never loadable). Call on one
    rank, while no other run can write into ``root``. Returns their names."""
    root = Path(root)
    gone = []
    if root.is_dir():
        for p in sorted(root.glob("step_*.tmp")):
            if STEP_FOLDER.fullmatch(p.name[: -len(".tmp")]) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
    return gone


def move_aside_newer(root: str | Path, resume_from: Path) -> list[str]:
    """Rename the complete checkpoints newer than ``resume_from`` (all damaged: the choice takes
    the newest intact one) to ``<name>.damaged``, so the run's own saves never replace them and
    they no longer count as checkpoints. Returns the new names."""
    step = int(STEP_FOLDER.fullmatch(resume_from.name).group(1))
    moved = []
    for s, folder in complete_checkpoints(root):
        if s > step:
            target = folder.with_name(folder.name + DAMAGED)
            n = 1
            while target.exists():
                n += 1
                target = folder.with_name(f"{folder.name}{DAMAGED}-{n}")
            os.replace(folder, target)
            moved.append(target.name)
    return moved


def agreed_resume_folder(root: str | Path, resume: bool) -> Path | None:
    """Collective: the checkpoint every rank resumes from (None: start at step 0).

    Global rank 0 removes unfinished saves, takes the pre-flight's choice (or makes it here,
    verifying checksums, when the trainer runs without the pre-flight), moves damaged newer
    folders aside, and broadcasts the step."""
    step = -1
    if comm.world_rank() == 0:
        for name in remove_unfinished_saves(root):
            print(f"trb-nemo: removed {name} in {root}, a save interrupted by a crash", flush=True)
        folder = None
        if resume:
            known, folder = recorded_resume_choice(root)
            if not known or (folder is not None and not (folder / MODEL_META).is_file()):
                folder = choose_resume(root)
        if folder is not None:
            move_aside_newer(root, folder)
            step = int(STEP_FOLDER.fullmatch(folder.name).group(1))
    step = int(comm.broadcast(torch.tensor([step], dtype=torch.int64), src=0).item())
    return None if step < 0 else step_folder(root, step)


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

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
                  hf_config: dict | None = None, config_yaml: str | None = None) -> Path:
    """Collective: checkpoint after ``step`` completed steps; then keep the newest ``keep_last``.
    ``config_yaml``: the run's composed config, saved as ``config.yaml`` in the folder."""
    folder = save_checkpoint(
        step_folder(root, step), _sharded(training, is_loading=False),
        model_meta(spec, hf_config, step=step, world_size=comm.world_size(),
                   layout=_layout(training, pg)),
        rank_state={"rng": _rng_state(), "progress": progress, "step": step},
        extra_files={CONFIG_FILE: portable_yaml(config_yaml)} if config_yaml is not None else None,
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
    from megatron.core import dist_checkpointing

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
    if meta.get("world_size") == comm.world_size():
        if not own.is_file():  # choose_resume skips such a folder; it vanished since
            raise FileNotFoundError(f"{own} is missing: checkpoint {folder} is damaged")
        rank_state = torch.load(own, weights_only=False)
        _set_rng_state(rank_state["rng"])
        return Resumed(meta["step"], rank_state["progress"], True, same_model_layout)
    rank0 = torch.load(rank_state_path(folder, 0), weights_only=False)
    return Resumed(meta["step"], rank0["progress"], False, same_model_layout)
