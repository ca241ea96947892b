"""Megatron checkpoint folders: atomic dist_checkpointing saves with our metadata file.

A folder is complete exactly when it exists under its final name: every save writes into
``<name>.tmp`` (dist_checkpointing shards from all ranks, then the metadata file written last by
global rank 0) and rank 0 renames it after a barrier. A crash at any point leaves at most a
``.tmp`` folder, which nothing loads. dist_checkpointing stores every tensor by its global
(layout-free) key, so a folder saved at one TP/PP layout loads at any other.

Layout of the sharded state dict: ``{"model": model.sharded_state_dict(), **extra}``; the
training checkpoint adds the optimizer under ``"optimizer"``. Model-only loads read just the
``"model"`` entries, so a training checkpoint is also a weights checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from pathlib import Path

import torch
from megatron.core import dist_checkpointing

from trb_nemo.config.schema import ModelSpec
from trb_nemo.models.resolve import MODEL_META
from trb_nemo.parallel import comm


def rank_state_path(folder: str | Path, rank: int) -> Path:
    """Where a rank's own (not sharded) state lives in a checkpoint folder."""
    return Path(folder) / f"rank_{rank:05d}.pt"


def save_checkpoint(folder: str | Path, sharded_state_dict: dict, meta: dict,
                    rank_state: dict | None = None) -> Path:
    """Collective over the world: write ``sharded_state_dict``, each rank's ``rank_state``
    (torch.save, e.g. RNG states) and ``meta`` atomically to ``folder``."""
    final = Path(folder)
    tmp = final.with_name(final.name + ".tmp")
    if comm.world_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed save
        tmp.mkdir(parents=True)
    comm.barrier()
    dist_checkpointing.save(sharded_state_dict, str(tmp))
    if rank_state is not None:
        torch.save(rank_state, rank_state_path(tmp, comm.world_rank()))
    comm.barrier()
    if comm.world_rank() == 0:
        _drop_save_path(tmp)
        _write_json_atomic(tmp / MODEL_META, meta)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    comm.barrier()
    return final


def model_meta(spec: ModelSpec, hf_config: dict | None = None, **extra) -> dict:
    """The metadata file's content: the architecture (ModelSpec fields) and the HF source config."""
    return {"format": 1, "spec": dataclasses.asdict(spec), "hf_config": hf_config, **extra}


def save_model(folder: str | Path, model, spec: ModelSpec, hf_config: dict | None = None) -> Path:
    """Weights only (collective)."""
    return save_checkpoint(folder, {"model": model.sharded_state_dict()}, model_meta(spec, hf_config))


@torch.no_grad()
def load_model(folder: str | Path, model) -> None:
    """Load the ``model`` entries of a checkpoint folder into this rank's stage (collective)."""
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(folder))
    model.load_state_dict(state["model"], strict=True)


def _drop_save_path(folder: Path) -> None:
    """torch.distributed.checkpoint records the absolute folder it wrote to (the ``.tmp`` name)
    in ``.metadata``; loading never reads it. Drop it, so a folder can be moved or shipped
    without carrying the writing machine's paths."""
    path = folder / ".metadata"
    if not path.is_file():
        return
    with open(path, "rb") as f:
        metadata = pickle.load(f)
    if getattr(metadata, "storage_meta", None) is not None:
        metadata.storage_meta.checkpoint_id = None
        with open(path, "wb") as f:
            pickle.dump(metadata, f)


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
