"""What a checkpoint folder is, without torch (the pre-flight, the launcher, ``convert`` and
resume read it before any rank starts): the metadata file every Megatron checkpoint we save
holds, the ``step_<N>`` folders of a training run, and the one rule for "the newest complete
checkpoint".

Layout: ``<root>/step_0000012/`` (seven digits) holds one checkpoint; it is complete when its
``MODEL_META`` file exists (written last). ``<root>.tmp``/``.damaged`` variants never match.
A run folder keeps its checkpoints in ``<run folder>/checkpoints/`` (``CHECKPOINTS``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from trb_nemo.config.schema import ConfigError

CHECKPOINTS = "checkpoints"
"""The sub-folder of a run folder holding its checkpoints (unless ``checkpoint.dir`` is set)."""
STEP_FOLDER = re.compile(r"step_(\d{7})")
"""A training checkpoint's folder name: ``step_`` and the step in seven digits."""


MODEL_META = "trb_nemo_model.json"
"""Written into every Megatron checkpoint folder we save: the network's ModelSpec fields and,
when it came from HF, the source config.json (so export restores the same HF config)."""


def read_model_meta(folder: str, key: str) -> dict:
    """The metadata of a complete trb-nemo Megatron checkpoint folder, or ConfigError(key)."""
    path = Path(folder)
    if not path.exists():
        raise ConfigError(key, f"{folder!r} does not exist")
    meta = path / MODEL_META
    if not meta.is_file():
        newest = latest_checkpoint(path)
        hint = f" (it holds training checkpoints: use {newest})" if newest is not None else ""
        raise ConfigError(key, f"{folder!r} is not a complete trb-nemo checkpoint: no {MODEL_META}"
                          f"{hint}; make one with `trb-nemo convert hf-to-megatron`")
    return json.loads(meta.read_text())


def step_folder(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_FOLDER.fullmatch(p.name)
        if m and p.is_dir() and (p / MODEL_META).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint, unverified (see :func:`choose_resume`)."""
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def newest_checkpoint(folder: str) -> str:
    """``folder`` when it is a checkpoint; for a run folder (or its ``checkpoints/``) its newest
    complete ``step_*``; else ConfigError(--checkpoint) saying where checkpoints were looked for."""
    path = Path(folder)
    if (path / MODEL_META).is_file() or not path.is_dir():
        return folder  # a checkpoint, or read_model_meta says what is wrong
    steps = complete_checkpoints(path) + complete_checkpoints(path / CHECKPOINTS)
    if not steps:
        raise ConfigError("--checkpoint", f"{folder!r} is not a checkpoint and holds no complete "
                          f"step_* checkpoint (looked in it and in {path / CHECKPOINTS}); "
                          "point it at a step_<N> folder or a `trb-nemo convert` output")
    return str(max(steps)[1])
