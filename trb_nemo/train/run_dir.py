"""The run folder: where a run writes, and its life cycle (no torch import: the launcher and the
CLI use it too). Every other file asks :class:`RunFolder` for these paths.

``<logging.output_dir>/<logging.run_name>/``:
* ``checkpoints/`` (unless ``checkpoint.dir`` is set): the ``step_<N>`` folders
  (:mod:`trb_nemo.models.folders`);
* ``config.yaml``: the resolved config the run uses; a previous one with other content is kept
  as ``config.before_step_<N>.yaml`` (:meth:`RunFolder.save_config`);
* ``config_changes.jsonl``: one line per resume with allowed run-defining changes;
* ``metrics.jsonl``, ``tensorboard/``, ``report.md``/``.png``, ``slurm/`` (scripts, job logs);
* ``STOPPED_BY_SIGNAL``: a signal stopped the run after a checkpoint (the Slurm job requeues);
* ``.lock``: held by the live run (:class:`RunFolderLock`).

Life cycle: the process that starts a run takes the lock, the pre-flight checks the folders
take files (:meth:`RunFolder.check_writable`) and chooses the checkpoint to resume from
(:meth:`RunFolder.record_resume_choice`, handed to the ranks), rank 0 saves the config, the
trainer writes metrics, checkpoints, the report or the stop marker.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from trb_nemo.config.schema import ConfigError, TrainConfig
from trb_nemo.models.folders import CHECKPOINTS, STEP_FOLDER

CONFIG_FILE = "config.yaml"
CONFIG_CHANGES = "config_changes.jsonl"
METRICS = "metrics.jsonl"
REPORT = "report.md"
STOP_MARKER = "STOPPED_BY_SIGNAL"
"""Written into the run folder when a signal stopped the run after a checkpoint; the Slurm job
script requeues itself when it finds it."""
LOCK_FILE = ".lock"
"""``<pid> <host>`` of the process that runs in the folder, flock'ed while it runs."""
RESUME_ENV = "TRB_NEMO_RESUME"
"""The pre-flight's choice, ``{"dir": ..., "folder": name or null}`` as JSON: the local ranks
inherit it from the process that started them; under torchrun/srun each rank ran the pre-flight
itself. Only global rank 0's counts (:func:`trb_nemo.train.checkpoint.agreed_resume_folder`)."""


@dataclass(frozen=True)
class RunFolder:
    """One run's folder and its checkpoint folder (module docstring)."""

    path: Path
    checkpoints: Path
    """``checkpoint.dir``, or ``<run folder>/checkpoints``."""
    checkpoint_key: str = "logging.output_dir"
    """The config key that places ``checkpoints`` (for error messages)."""

    @classmethod
    def of(cls, cfg: TrainConfig) -> RunFolder:
        path = Path(cfg.logging.output_dir) / cfg.logging.run_name
        if cfg.checkpoint.dir:
            return cls(path, Path(cfg.checkpoint.dir), "checkpoint.dir")
        return cls(path, path / CHECKPOINTS)

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def config_changes(self) -> Path:
        return self.path / CONFIG_CHANGES

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def report(self) -> Path:
        return self.path / REPORT

    @property
    def stop_marker(self) -> Path:
        return self.path / STOP_MARKER

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def slurm(self) -> Path:
        return self.path / "slurm"

    def lock(self) -> RunFolderLock:
        return RunFolderLock(self.path)

    # ---------------------------------------------------------------------------- life cycle

    def check_writable(self) -> None:
        """Create the run folder and the checkpoint folder and write a file into each, so a
        folder that cannot take the outputs stops the run now, not at its first save."""
        _writable_folder(self.path, "logging.output_dir")
        _writable_folder(self.checkpoints, self.checkpoint_key)

    def record_resume_choice(self, folder: Path | None) -> None:
        """Hand the pre-flight's choice of checkpoint (None: start at step 0) to the ranks this
        process starts (:data:`RESUME_ENV`)."""
        os.environ[RESUME_ENV] = json.dumps({"dir": str(self.checkpoints.resolve()),
                                             "folder": folder.name if folder else None})

    def started(self, text: str, resumed_from: Path | None) -> None:
        """The run has started (its checkpoint, if any, loaded): record it on disk (global rank
        0). Changed run-defining settings of a resume (which the pre-flight allowed) are
        appended to ``config_changes.jsonl``, then ``config.yaml`` is written
        (:meth:`save_config`). Nothing is written before this, so a start that fails or is
        refused leaves the folder as it was."""
        step = int(STEP_FOLDER.fullmatch(resumed_from.name).group(1)) if resumed_from else 0
        if resumed_from is not None:
            diffs = saved_config_differences(resumed_from, text)
            if diffs:
                self.record_config_change({"step": step, "checkpoint": resumed_from.name,
                                           "changes": {k: [a, b] for k, a, b in diffs}})
        self.save_config(text, step)

    def save_config(self, text: str, start_step: int = 0) -> None:
        """Write ``config.yaml`` (one rank). A previous config.yaml with other content is
        renamed ``config.before_step_<N>.yaml``, N = ``start_step``, the step this run starts at:
        the settings that produced the steps before N."""
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.config_file
        if path.is_file() and path.read_text() != text:
            self.keep_previous_config(start_step)
        path.write_text(text)

    def keep_previous_config(self, step: int) -> Path:
        """Rename ``config.yaml`` as :meth:`save_config` says; returns the new path."""
        target = self.path / f"config.before_step_{step:07d}.yaml"
        n = 1
        while target.exists():
            n += 1
            target = self.path / f"config.before_step_{step:07d}-{n}.yaml"
        self.config_file.rename(target)
        return target

    def remove_if_unused(self) -> None:
        """Remove what a start that never ran left of a folder it created: the lock file, an
        empty checkpoint folder, then the run folder if empty (never anything else)."""
        try:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
        except OSError:  # a file where a folder of the path should be: nothing was created
            return
        for folder in (self.checkpoints, self.path):
            try:
                folder.rmdir()  # only when empty
            except OSError:
                pass

    def record_config_change(self, record: dict) -> None:
        """Append ``record`` (step, checkpoint, changes) to ``config_changes.jsonl``, unless the
        last line already records this very change (a rerun after a crash before the next
        checkpoint)."""
        path = self.config_changes
        lines = path.read_text().splitlines() if path.is_file() else []
        if lines:
            try:
                last = json.loads(lines[-1])
                if {k: last.get(k) for k in record} == json.loads(json.dumps(record)):
                    return
            except ValueError:
                pass
        record["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def recorded_resume_choice(checkpoints: str | Path) -> tuple[bool, Path | None]:
    """(found, folder): the pre-flight's choice for the checkpoint folder ``checkpoints``, if
    this process tree has one (:data:`RESUME_ENV`)."""
    try:
        rec = json.loads(os.environ.get(RESUME_ENV, ""))
        if rec["dir"] != str(Path(checkpoints).resolve()):
            return False, None
        return True, (Path(checkpoints) / rec["folder"] if rec["folder"] else None)
    except (ValueError, KeyError, TypeError):
        return False, None


def _writable_folder(folder: Path, key: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".trb-nemo-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
        why = (f"{str(blocker)!r} is a file, not a folder" if blocker is not None
               and not blocker.is_dir() else e.strerror or type(e).__name__)
        raise ConfigError(key, f"cannot write into {str(folder)!r}: {why}; choose a folder this "
                          "job can write") from None


class RunFolderLock:
    """An exclusive ``flock`` on ``<run folder>/.lock``: one live run per folder.

    The kernel releases it when the holder exits, however it exits (SIGKILL, a crashed node's
    NFS lease aside), so a stale file never blocks a rerun. Taken by the process that starts the
    run (the launcher, or global rank 0 under torchrun/srun) before anything is written."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def acquire(self, create: bool = True) -> bool:
        """Take the lock (again: a no-op); False when the folder does not exist and not
        ``create``. Raises ConfigError(logging.run_name) naming the live run's pid and host."""
        if self._fd is not None:
            return True
        if not create and not self.run_dir.is_dir():
            return False
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").split()
            os.close(fd)
            who = (f"pid {holder[0]} on host {holder[1]}" if len(holder) >= 2
                   else "another process")
            raise ConfigError("logging.run_name", f"run folder {self.run_dir} is in use by {who}; "
                              "wait for that run to end or stop it (rerunning then resumes it), "
                              "or choose another logging.run_name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock; the file stays (removing it would race)
            self._fd = None


# ------------------------------------------------------------- settings that define the run

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
NOT_ARCHITECTURE = ("name", "hf_path", "checkpoint", "eos_token_id", "max_sequence_length")
"""ModelSpec fields that are not the network's architecture (every other one is)."""
_SHOWN = 6


def fixed_by_checkpoint(key: str) -> bool:
    """A setting no resume can change, ``allow_config_change`` or not: the student's
    architecture (its checkpoint's tensors) and either network's vocabulary."""
    if key in ("model.student.vocab_size", "model.teacher.vocab_size"):
        return True
    prefix = "model.student."
    return key.startswith(prefix) and key[len(prefix):] not in NOT_ARCHITECTURE


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


def portable_yaml(text: str) -> str:
    """``text`` with the project checkout's path written ``${project_root:}``, as conf/ writes
    it: a checkpoint does not record where the checkout was, and a config does not compare
    unequal to it only because the checkout moved."""
    from trb_nemo.config.compose import project_root

    return text.replace(f"{project_root()}/", "${project_root:}/")


def _as_dict(yaml_text: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(yaml_text))


def saved_config_differences(folder: Path, text: str) -> list[tuple[str, object, object]]:
    """:func:`config_differences` between the config saved in checkpoint ``folder`` and the
    composed config ``text`` (both portable); [] when the checkpoint has no saved config.
    ConfigError(checkpoint.dir) when the saved one does not parse."""
    saved = folder / CONFIG_FILE
    if not saved.is_file():
        return []
    try:
        old = _as_dict(saved.read_text())
    except Exception as e:  # noqa: BLE001 - any parse failure means the same thing here
        raise ConfigError("checkpoint.dir", f"{str(saved)!r} is unreadable ({type(e).__name__}); "
                          "set checkpoint.resume=false to start over") from None
    return config_differences(old, _as_dict(portable_yaml(text)))


def _shown(value) -> str:
    """A value as a message shows it: the checkout's path written out, not ``${project_root:}``,
    and long values cut."""
    from trb_nemo.config.compose import project_root

    if isinstance(value, str):
        value = value.replace("${project_root:}", str(project_root()))
    text = repr(value)
    return text if len(text) <= 48 else text[:45] + "..."


def listed(diffs: list[tuple[str, object, object]]) -> str:
    """``key: old -> new, ...`` of the first few differences."""
    text = ", ".join(f"{k}: {_shown(a)} -> {_shown(b)}"
                     + (" (a data file's contents changed)" if k == "data.fingerprint" else "")
                     for k, a, b in diffs[:_SHOWN])
    if len(diffs) > _SHOWN:
        text += f" (and {len(diffs) - _SHOWN} more)"
    return text
