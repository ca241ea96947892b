"""Where a run writes (no torch import: the launcher and the CLI use it too).

``<logging.output_dir>/<logging.run_name>/``: metrics.jsonl, tensorboard/, report.md/.png,
config.yaml, checkpoints/ (unless checkpoint.dir is set), slurm/ (scripts and job logs), and
``.lock``, held by the live run (:class:`RunFolderLock`).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from trb_nemo.config.schema import ConfigError, TrainConfig

STOP_MARKER = "STOPPED_BY_SIGNAL"
"""Written into the run folder when a signal stopped the run after a checkpoint; the Slurm job
script requeues itself when it finds it."""


def run_dir_of(cfg: TrainConfig) -> Path:
    return Path(cfg.logging.output_dir) / cfg.logging.run_name


LOCK_FILE = ".lock"
"""In the run folder: ``<pid> <host>`` of the process that runs in it, flock'ed while it runs."""


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
