"""SIGTERM / SIGUSR1 (Slurm's pre-timeout warning) ask the trainer to stop after the current step.

The handler only sets a flag; the trainer asks :func:`stop_requested` once per step, which
all-reduces the flag (MAX over the world, 1 collective of [1]) so every rank stops at the same
step, saves the checkpoint together and exits cleanly.
"""

from __future__ import annotations

import signal

import torch

from trb_nemo.parallel import comm

_requested = {"signal": 0}


def _handler(signum, frame):
    _requested["signal"] = signum


def install() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _handler)


def stop_requested() -> int:
    """The signal number some rank received (0 = none). Collective over the world."""
    flag = torch.tensor([_requested["signal"]], dtype=torch.int64)
    if comm.is_initialized():
        flag = comm.all_reduce(flag, op="max")
    return int(flag.item())
