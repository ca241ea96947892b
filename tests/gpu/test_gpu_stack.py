"""GPU-only checks: NCCL groups and a TP=2 forward on CUDA. Skipped without CUDA.

Run on a GPU machine: .venv/bin/python -m pytest tests/gpu
"""

import pytest
import torch
import torch.distributed as dist
from harness import spawn

pytestmark = [pytest.mark.gpu, pytest.mark.dist]


def _nccl_all_reduce():
    t = torch.ones(4, device="cuda") * (dist.get_rank() + 1)
    dist.all_reduce(t)
    return dist.get_backend(), t.cpu()


def test_nccl_all_reduce():
    n = min(2, torch.cuda.device_count())
    out = spawn(_nccl_all_reduce, n, backend="nccl")
    expected = sum(range(1, n + 1))
    for backend, t in out:
        assert backend == "nccl"
        assert torch.equal(t, torch.full((4,), float(expected)))
