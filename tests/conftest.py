"""Shared pytest setup: markers and skips. Multi-rank helpers live in ``tests/harness.py``."""

import os
import sys

import pytest
import torch

# tests/ on sys.path so test modules import `harness` and spawned ranks can unpickle test functions
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def no_ranks(monkeypatch):
    """Fail the test if `trb-nemo train` would start a rank (input errors must come before)."""
    import trb_nemo.commands.train as entry

    def refuse(*args, **kwargs):
        raise AssertionError("a rank started")

    monkeypatch.setattr(entry, "run_local_ranks", refuse)
