"""The in-pytest rank spawner: results by rank, failures surface, timeouts kill whole groups.

Run: .venv/bin/python -m pytest tests/dist/test_spawn.py
"""

import os
import subprocess
import time

import pytest
import torch
import torch.distributed as dist
from harness import spawn, spawn_bare

from trb_nemo.parallel.spawn import RankFailure

pytestmark = pytest.mark.dist


def _all_reduce_rank():
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item()


def _rank1_raises():
    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 would wait here forever


def _sleep_with_grandchild(pid_dir):
    child = subprocess.Popen(["sleep", "300"])
    with open(os.path.join(pid_dir, f"{os.environ['RANK']}.pid"), "w") as f:
        f.write(str(child.pid))
    time.sleep(300)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead for our purpose
        return f.read().split()[2] != "Z"


def test_results_come_back_by_rank():
    out = spawn(_all_reduce_rank, 3)
    assert out == [(0, 3, 6.0), (1, 3, 6.0), (2, 3, 6.0)]


def test_a_failing_rank_fails_fast_with_its_traceback():
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as err:
        spawn(_rank1_raises, 2, timeout_s=120)
    assert err.value.rank == 1
    assert "boom on rank 1" in err.value.detail
    assert time.monotonic() - t0 < 60


def test_timeout_kills_every_rank_and_what_it_started(tmp_path):
    with pytest.raises(TimeoutError):
        spawn_bare(_sleep_with_grandchild, 2, str(tmp_path), timeout_s=15)
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "a grandchild outlived the timeout"
