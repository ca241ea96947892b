"""Shared pytest setup: markers and skips, and the guard that no test depends on the checkout's
state: every test runs in a working directory of its own (an empty temporary folder), and the
suite fails if the checkout's ``outputs/`` (the demo's runs, a user's runs) changed while it ran.
Multi-rank helpers live in ``tests/harness.py``."""

import os
import sys
from pathlib import Path

import pytest
import torch

CHECKOUT = Path(__file__).resolve().parents[1]

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


def outputs_state(checkout: Path = CHECKOUT):
    """Every path under the checkout's ``outputs/`` with its size and modification time (None
    when there is no such folder)."""
    root = checkout / "outputs"
    if not root.exists():
        return None
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*"))


def pytest_sessionstart(session):
    session.config.stash[_OUTPUTS] = outputs_state()


def pytest_sessionfinish(session, exitstatus):
    if outputs_state() != session.config.stash[_OUTPUTS]:
        sys.stderr.write("\nconftest: the test suite changed the checkout's outputs/ folder; a "
                         "test must write under its own tmp_path (each test runs in a temporary "
                         "working directory: use relative paths or tmp_path)\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_OUTPUTS = pytest.StashKey()


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path_factory, monkeypatch):
    """Each test starts in an empty folder of its own: a test that reads or writes relative paths
    (``outputs/``, the default ``logging.output_dir``) touches only that folder."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
