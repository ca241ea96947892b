"""Start the ranks of a torch.distributed job as local processes (no torchrun).

Used by ``trb-nemo train`` when it is not launched under torchrun or srun, and by the test
harness, which spawns gloo ranks from inside pytest. Each rank is a fresh ``spawn`` process
that leads its own process group (``os.setsid``), so a timeout or a failure kills the rank
and everything it started (dist_checkpointing's writer processes, say): distributed failures
look like hangs, and nothing may outlive the job.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.multiprocessing as mp

_FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class RankFailure(RuntimeError):
    """A rank raised or died; the message carries its rank and traceback (or exit code)."""

    def __init__(self, rank: int, detail: str):
        super().__init__(f"rank {rank} failed:\n{detail}")
        self.rank = rank
        self.detail = detail


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world_size, port, args, env, results):
    os.setsid()  # this rank leads a process group: killpg reaches everything it starts
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


def _kill(procs, sig=signal.SIGKILL, *, alive_only: bool = False) -> None:
    for p in procs:
        if p.pid is not None and not (alive_only and p.exitcode is not None):
            try:
                os.killpg(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def run_local_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    *,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` local processes and return their results by rank.

    Each process gets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT,
    plus ``env`` (default ``OMP_NUM_THREADS=1``), so ``init_process_group(init_method="env://")``
    works inside ``fn``. ``fn`` must be importable (module level). SIGTERM, SIGINT and SIGUSR1
    sent to the caller are forwarded to every rank (graceful stop and checkpoint).

    Raises:
        RankFailure: the first rank that raised (its traceback) or died (its exit code); the
            other ranks are killed at once, since they would wait forever in a collective.
        TimeoutError: ``timeout_s`` passed; every rank's process group was killed.
    """
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    rank_env = {"OMP_NUM_THREADS": "1", **(env or {})}
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world_size, port, tuple(args), rank_env, results))
        for r in range(world_size)
    ]
    previous = {}
    if _in_main_thread():
        for sig in _FORWARDED_SIGNALS:
            previous[sig] = signal.signal(sig, lambda s, _f: _kill(procs, s, alive_only=True))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    outputs: dict[int, Any] = {}
    try:
        for p in procs:
            p.start()
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


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
