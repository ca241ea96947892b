"""Start the ranks of a torch.distributed job as local processes (no torchrun).

Used by ``trb-nemo train`` when it is not launched under torchrun or srun, and by the test
harness, which spawns gloo ranks from inside pytest. Each rank is a fresh ``spawn`` process
that leads its own process group (``os.setsid``), so a timeout or a failure kills the rank
and everything it started (dist_checkpointing's writer processes, say): distributed failures
look like hangs, and nothing may outlive the job. A terminal's Ctrl-C therefore reaches the
launcher only, which forwards it.

Signals and deaths:

* SIGTERM, SIGINT and SIGUSR1 sent to the launcher are forwarded to each rank's own pid, never
  to its process group: a rank's helper processes (Megatron's ``multiprocessing.Manager``, say)
  must survive the signal for the checkpoint that follows it. A second SIGINT (Ctrl-C) kills
  every rank's process group at once and raises :class:`Interrupted`.
* A rank dies with the launcher, however the launcher dies (SIGKILL included): it asks the
  kernel for SIGKILL on its parent's death (:func:`die_with_parent`). Helper processes a rank
  starts through :func:`start_helper_manager` ignore the stop signals (Slurm signals every
  process of a step) and die with the rank the same way.

torch is imported inside the functions that need it: a helper process imports this module to
run :func:`_helper_init` and stays small.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import multiprocessing
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

ALLOC_CONF_DEFAULT = ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
"""The ranks' CUDA caching allocator maps memory in growable segments unless the user set
``PYTORCH_CUDA_ALLOC_CONF`` (or torch's newer ``PYTORCH_ALLOC_CONF``): every step allocates and
frees tens of GB of KV cache and offloads storages, which fixed-size segments fragment
(the Slurm job script exports the same default, ``launcher.env``)."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""The signals that ask a job to stop: the launcher forwards them, helper processes ignore them."""
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class RankFailure(RuntimeError):
    """A rank raised or died; the message carries its rank and traceback (or exit code)."""

    def __init__(self, rank: int, detail: str):
        super().__init__(f"rank {rank} failed:\n{detail}")
        self.rank = rank
        self.detail = detail


class Interrupted(KeyboardInterrupt):
    """A second Ctrl-C (SIGINT) reached the launcher: every rank was killed at once."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux ``PR_SET_PDEATHSIG``; a
    no-op elsewhere), and exit now if the parent ``parent_pid`` is already gone. Call first
    thing in a child, from its main thread; the parent must outlive its own starting thread."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if os.getppid() != parent_pid:  # died before the prctl: no signal would come
        os._exit(1)


def _helper_init(parent_pid: int) -> None:
    """In a helper process, before it serves: ignore the stop signals, die with the rank."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    die_with_parent(parent_pid)


def start_helper_manager():
    """A started ``multiprocessing`` SyncManager (spawn context) whose server process ignores
    SIGTERM, SIGINT and SIGUSR1 and is SIGKILLed when this process dies. The stop signals stay
    blocked in this thread while the server starts (a blocked mask is inherited through
    fork and exec), so none reaches it before its initializer ignores them; one that arrives
    meanwhile is delivered here afterwards. Keep a reference: the server shuts down when the
    manager object is collected or this process exits."""
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        manager.start(_helper_init, (os.getpid(),))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    return manager


def _rank_main(fn, rank, world_size, port, args, env, results, parent_pid):
    die_with_parent(parent_pid)  # a SIGKILLed launcher leaves no rank behind
    os.setsid()  # this rank leads a process group: killpg reaches everything it starts
    import torch

    os.environ.update(env)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        out = fn(*args)
        buf = io.BytesIO()
        torch.save(out, buf)  # bytes, not shared-memory tensors: the rank exits right after
        results.put((rank, True, buf.getvalue()))
    except BaseException as e:  # noqa: BLE001 - every failure must reach the parent
        detail = e.detail if isinstance(e, RankFailure) else traceback.format_exc()
        results.put((rank, False, detail))
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _kill(procs, sig=signal.SIGKILL) -> None:
    """``sig`` to each rank's whole process group (the rank and everything it started)."""
    for p in procs:
        if p.pid is not None:
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


class _Forward:
    """The launcher's handler of the stop signals: each goes to every live rank's own pid (its
    helper processes must survive it); a second SIGINT raises :class:`Interrupted` instead,
    and the caller's cleanup kills every rank's process group."""

    def __init__(self, procs, interrupt_note: str | None):
        self.procs, self.note, self.interrupts = procs, interrupt_note, 0

    def __call__(self, sig, _frame) -> None:
        if sig == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts == 2:
                raise Interrupted()
            if self.interrupts > 2:
                return  # the ranks are being killed already
            if self.note:
                os.write(2, (self.note + "\n").encode())  # no print(): not reentrant
        for p in self.procs:
            if p.pid is not None and p.exitcode is None:
                try:
                    os.kill(p.pid, sig)
                except ProcessLookupError:
                    pass


def run_local_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
    interrupt_note: str | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` local processes and return their results by rank.

    Each process gets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT,
    plus ``env`` (default ``OMP_NUM_THREADS=1``), so ``init_process_group(init_method="env://")``
    works inside ``fn``; and :data:`ALLOC_CONF_DEFAULT` in its environment from its start (before
    torch loads) unless this process's environment sets it. ``fn`` must be importable (module
    level). SIGTERM, SIGINT and SIGUSR1 sent to the caller are forwarded to every rank's pid
    (graceful stop and checkpoint); the first SIGINT also writes ``interrupt_note`` to stderr, a
    second one kills every rank at once.
    Each rank dies with the caller's process, even by SIGKILL (Linux).

    Raises:
        RankFailure: the first rank that raised (its traceback) or died (its exit code); the
            other ranks are killed at once, since they would wait forever in a collective.
        TimeoutError: ``timeout_s`` passed; every rank's process group was killed.
        Interrupted: a second SIGINT; every rank's process group was killed.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    rank_env = {"OMP_NUM_THREADS": "1", **(env or {})}
    procs = [
        ctx.Process(target=_rank_main,
                    args=(fn, r, world_size, port, tuple(args), rank_env, results, os.getpid()))
        for r in range(world_size)
    ]
    previous = {}
    if _in_main_thread():
        forward = _Forward(procs, interrupt_note)
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, forward)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        with _environment_default(*ALLOC_CONF_DEFAULT, unless=("PYTORCH_ALLOC_CONF",)):
            for p in procs:
                p.start()  # a spawned process inherits this process's environment
        outputs = _poll_results(procs, results, deadline, timeout_s)
        for p in procs:
            p.join(timeout=30)
        return [outputs[r] for r in range(world_size)]
    finally:
        _kill(procs)  # the ranks' whole process groups, including what a rank left running
        for p in procs:
            if p.pid is not None:
                p.join(timeout=5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _environment_default(name: str, value: str, unless: Sequence[str] = ()):
    """``name=value`` in this process's environment within the block (restored after) unless it
    or one of ``unless`` is set already."""
    if name in os.environ or any(k in os.environ for k in unless):
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _poll_results(procs, results, deadline: float | None,
                  timeout_s: float | None) -> dict[int, Any]:
    """Every rank's result by rank, read from ``results`` as the started ``procs`` put them.

    Raises:
        RankFailure: a rank put a failure, or exited without a result.
        TimeoutError: the ``time.monotonic()`` ``deadline`` passed (``timeout_s`` for the message).
    """
    import torch

    world_size = len(procs)
    outputs: dict[int, Any] = {}
    while len(outputs) < world_size:
        while not results.empty():
            rank, ok, payload = results.get()
            if not ok:
                raise RankFailure(rank, payload)
            outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
        if len(outputs) == world_size:
            break
        for r, p in enumerate(procs):
            if p.exitcode is not None and r not in outputs and results.empty():
                time.sleep(0.2)  # a result may still be in flight behind the exit
                if results.empty():
                    raise RankFailure(r, f"exited with code {p.exitcode} without a result")
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"{world_size} local ranks did not finish within {timeout_s:.0f} s")
        time.sleep(0.02)
    return outputs


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
