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

    def recorded_resume_choice(self) -> tuple[bool, Path | None]:
        """(found, folder): the pre-flight's choice for this checkpoint folder, if this process
        tree has one."""
        return recorded_resume_choice(self.checkpoints)

    def save_config(self, text: str) -> None:
        """Write ``config.yaml`` (call on one rank, after the pre-flight accepted the settings).
        A previous config.yaml with other content is renamed ``config.before_step_<N>.yaml``, N
        the step this run starts at (the recorded resume choice's, 0 when it starts over): the
        settings that produced the steps before N."""
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.config_file
        if path.is_file() and path.read_text() != text:
            self.keep_previous_config()
        path.write_text(text)

    def keep_previous_config(self) -> Path:
        """Rename ``config.yaml`` as :meth:`save_config` says; returns the new path."""
        _, folder = self.recorded_resume_choice()
        step = int(STEP_FOLDER.fullmatch(folder.name).group(1)) if folder is not None else 0
        target = self.path / f"config.before_step_{step:07d}.yaml"
        n = 1
        while target.exists():
            n += 1
            target = self.path / f"config.before_step_{step:07d}-{n}.yaml"
        self.config_file.rename(target)
        return target

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
