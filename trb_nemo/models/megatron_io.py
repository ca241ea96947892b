"""Megatron checkpoint folders: atomic dist_checkpointing saves with our metadata file.

A folder is complete exactly when it exists under its final name: every save writes into
``<name>.tmp`` (dist_checkpointing shards from all ranks, each rank's own state, then global rank
0's metadata file and, last, ``manifest.json``) and rank 0 renames it after a barrier. A crash at
any point leaves at most a ``.tmp`` folder, which nothing loads. dist_checkpointing stores every
tensor by its global (layout-free) key, so a folder saved at one TP/PP layout loads at any other.

``manifest.json`` lists every other file of the folder with its size and CRC-32, so damage done
after the save (a shard deleted or truncated, ``.metadata`` cut short, a rank's state missing) is
found before the folder is trusted: :func:`verify_checkpoint`. Each rank checksums the files it
wrote itself (while they are still in its page cache), rank 0 the rest; files are read in 16 MiB
blocks, several at a time (zlib releases the GIL), so a multi-GB checkpoint costs seconds.
Folders written before manifests existed have none; they get only cheap structural checks.

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
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from trb_nemo.config.schema import ModelSpec
from trb_nemo.models.folders import MODEL_META
from trb_nemo.parallel import comm


def rank_state_path(folder: str | Path, rank: int) -> Path:
    """Where a rank's own (not sharded) state lives in a checkpoint folder."""
    return Path(folder) / f"rank_{rank:05d}.pt"


def save_checkpoint(folder: str | Path, sharded_state_dict: dict, meta: dict,
                    rank_state: dict | None = None, extra_files: dict[str, str] | None = None
                    ) -> Path:
    """Collective over the world: write ``sharded_state_dict``, each rank's ``rank_state``
    (torch.save, e.g. RNG states), ``meta``, rank 0's ``extra_files`` (name -> text) and the
    manifest atomically to ``folder``."""
    from megatron.core import dist_checkpointing  # here: the pre-flight imports this module

    final = Path(folder)
    tmp = final.with_name(final.name + ".tmp")
    rank = comm.world_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed save
        tmp.mkdir(parents=True)
    comm.barrier()
    # every rank, after the barrier: another node may not see rank 0's new folder yet (NFS
    # attribute caching); creating it again there is harmless and makes it visible
    tmp.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(sharded_state_dict, str(tmp))
    own = sorted(tmp.glob(f"__{rank}_*.distcp"))  # torch DCP names a rank's shards __<rank>_<i>
    if rank_state is not None:
        torch.save(rank_state, rank_state_path(tmp, rank))
        own.append(rank_state_path(tmp, rank))
    _write_json_atomic(tmp / _rank_manifest_name(rank), _digests(tmp, own))
    comm.barrier()
    if rank == 0:
        _drop_save_path(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        _write_json_atomic(tmp / MODEL_META, meta)
        _write_manifest(tmp, comm.world_size())  # last: it covers every other file
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    comm.barrier()
    return final


# ------------------------------------------------------------------------------------ manifest

MANIFEST = "manifest.json"
"""``{"format": 1, "checksum": "crc32", "world_size": W, "files": {path: [bytes, crc32]}}`` for
every file of a checkpoint folder but itself (paths relative, ``/``-separated)."""
_RANK_MANIFEST = ".manifest_rank_"  # a rank's own digests, merged into the manifest by rank 0
_BLOCK = 16 << 20


def _rank_manifest_name(rank: int) -> str:
    return f"{_RANK_MANIFEST}{rank:05d}.json"


def file_digest(path: str | Path) -> tuple[int, int]:
    """(size in bytes, CRC-32) of a file, read in 16 MiB blocks."""
    crc, size = 0, 0
    buf = bytearray(_BLOCK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return size, crc


def _parallel_digests(paths: list[Path]) -> list[tuple[int, int]]:
    if len(paths) <= 1:
        return [file_digest(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(paths))) as pool:
        return list(pool.map(file_digest, paths))


def _digests(folder: Path, paths: list[Path]) -> dict[str, list[int]]:
    return {p.relative_to(folder).as_posix(): list(d)
            for p, d in zip(paths, _parallel_digests(paths), strict=True)}


def _files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _write_manifest(folder: Path, world_size: int) -> None:
    """Rank 0, after every rank wrote and digested its files: merge the ranks' digests, digest
    the rest (``.metadata``, rank 0's files, the metadata files) and write the manifest."""
    files: dict[str, list[int]] = {}
    for partial in sorted(folder.glob(f"{_RANK_MANIFEST}*.json")):
        files.update(json.loads(partial.read_text()))
        partial.unlink()
    rest = []
    for p in _files_of(folder):
        rel = p.relative_to(folder).as_posix()
        if rel == MANIFEST or rel.endswith(".partial"):
            continue
        if rel not in files or files[rel][0] != p.stat().st_size:
            rest.append(p)
    files.update(_digests(folder, rest))
    _write_json_atomic(folder / MANIFEST, {"format": 1, "checksum": "crc32",
                                           "world_size": world_size, "files": files})


def write_manifest(folder: str | Path, world_size: int = 1) -> None:
    """Digest every file of ``folder`` into its manifest (one process; tests and tools)."""
    _write_manifest(Path(folder), world_size)


def verify_checkpoint(folder: str | Path, checksums: bool = True) -> str | None:
    """Why ``folder`` cannot be trusted, or None when it is intact.

    With a manifest: every listed file must exist with its size and (``checksums``) its CRC-32;
    the first problem in path order is returned. Without one (written before manifests existed)
    only what is cheap to check: ``.metadata`` and, for a training checkpoint, every rank's state
    for the world size it records."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return _legacy_problem(folder)
    try:
        manifest = json.loads(path.read_text())
        files = {str(k): (int(v[0]), int(v[1])) for k, v in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return f"{MANIFEST} is unreadable"
    names = sorted(files)
    for rel in names:
        p = folder / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != files[rel][0]:
            return f"{rel} has {p.stat().st_size} bytes, {files[rel][0]} were written"
    if checksums:
        for rel, (_, crc) in zip(names, _parallel_digests([folder / n for n in names]),
                                 strict=True):
            if crc != files[rel][1]:
                return f"{rel} does not match its checksum"
    return None


def _legacy_problem(folder: Path) -> str | None:
    if not (folder / ".metadata").is_file():
        return ".metadata is missing"
    try:  # torch DCP's index: where each saved chunk lives (file, offset, length)
        with open(folder / ".metadata", "rb") as f:
            storage = pickle.load(f).storage_data
        ends: dict[str, int] = {}
        for info in storage.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0),
                                           info.offset + info.length)
    except Exception:  # noqa: BLE001 - a truncated or foreign pickle fails in many ways
        return ".metadata is unreadable"
    for rel, end in sorted(ends.items()):
        if not (folder / rel).is_file():
            return f"{rel} is missing"
        if (folder / rel).stat().st_size < end:
            return f"{rel} has {(folder / rel).stat().st_size} bytes, {end} are indexed"
    try:
        meta = json.loads((folder / MODEL_META).read_text())
    except (OSError, ValueError):
        return f"{MODEL_META} is unreadable"
    world = meta.get("world_size") if isinstance(meta, dict) else None
    if isinstance(world, int) and any(folder.glob("rank_*.pt")):
        for r in range(world):
            if not rank_state_path(folder, r).is_file():
                return f"{rank_state_path(folder, r).name} is missing"
    return None


def model_meta(spec: ModelSpec, hf_config: dict | None = None, **extra) -> dict:
    """The metadata file's content: the architecture (ModelSpec fields) and the HF source config."""
    return {"format": 1, "spec": dataclasses.asdict(spec), "hf_config": hf_config, **extra}


def save_model(folder: str | Path, model, spec: ModelSpec, hf_config: dict | None = None) -> Path:
    """Weights only (collective)."""
    return save_checkpoint(folder, {"model": model.sharded_state_dict()}, model_meta(spec, hf_config))


@torch.no_grad()
def load_model(folder: str | Path, model) -> None:
    """Load the ``model`` entries of a checkpoint folder into this rank's stage (collective)."""
    from megatron.core import dist_checkpointing

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
