"""SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 (Slurm's pre-timeout warning) ask the trainer to stop:
after the current step, or inside a long phase (a rollout, an evaluation), so a stop saves within
minutes even when a step or an evaluation lasts longer than Slurm's warning.

The handler only sets a flag; the trainer asks :func:`stop_requested` once per step, which
all-reduces the flag (MAX over the world, 1 collective of [1]) so every rank stops at the same
step, saves the checkpoint together and exits cleanly. Inside decoding the decoder asks
:data:`INTERRUPT` every few dozen steps over its model-parallel group (ranks decoding in lockstep)
and stops there; after the phase every rank meets the others and they agree over the world.

One Ctrl-C may reach a rank twice (a terminal signals the whole foreground process group and a
launcher such as torchrun forwards it as well): a signal within ``DUPLICATE_S`` of the same one
counts once. A later second SIGINT stops the rank at once (default action, no traceback); the
local launcher handles that case itself (it kills its ranks), see ``parallel/spawn.py``.

The stop signals must reach the trainer only: Megatron's dist_checkpointing keeps its write
results in a ``multiprocessing.Manager`` that it starts at the first save, and a signal that
kills it (Slurm signals every process of a job step) breaks every later save with a
BrokenPipeError. :func:`install` therefore starts that Manager itself, immune to the stop
signals and dying with the rank, and hands its queue to Megatron.
"""

from __future__ import annotations

import os
import signal
import time

import torch

from trb_nemo.parallel import comm
from trb_nemo.parallel.spawn import STOP_SIGNALS, start_helper_manager

DUPLICATE_S = 1.0
"""A stop signal this soon after the same one is the same request delivered twice."""

_requested = {"signal": 0}
_last_counted: dict[int, float] = {}
_helpers: list = []  # started helper managers: their servers live as long as these objects


def _handler(signum, frame):
    now = time.monotonic()
    last = _last_counted.get(signum)
    if last is not None and now - last < DUPLICATE_S:
        return  # one request that arrived twice
    _last_counted[signum] = now
    if signum == signal.SIGINT and last is not None:  # a second Ctrl-C: stop now
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return
    _requested["signal"] = signum


def install() -> None:
    """Handle the stop signals in this process (a rank) and start the checkpoint writer's
    helper process immune to them."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)
    _start_checkpoint_results_queue()


def _start_checkpoint_results_queue() -> None:
    """Give Megatron the write-results queue it would create at the first save
    (``filesystem_async.get_write_results_queue``: ``Manager().Queue()``, spawn context), served
    by a Manager that ignores the stop signals and dies with this process."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", "absent") is not None:
        return  # created already, or a Megatron without this cache: nothing to pre-seed
    manager = start_helper_manager()
    _helpers.append(manager)
    filesystem_async._results_queue = manager.Queue()


def stop_requested(group=None) -> int:
    """The signal number some rank of ``group`` (None: the world) received (0 = none).
    Collective over ``group``."""
    flag = torch.tensor([_requested["signal"]], dtype=torch.int64)
    if comm.is_initialized():
        flag = comm.all_reduce(flag, op="max", group=group)
    return int(flag.item())


class _StopSignalInterrupt:
    """The stop signals as a decoder's :class:`~trb_nemo.rollout.types.Interrupt`."""

    def requested(self, group) -> bool:
        return stop_requested(group) != 0


INTERRUPT = _StopSignalInterrupt()
