"""``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` by default, the user's own value kept:

* the ranks ``trb-nemo train`` starts itself (:func:`trb_nemo.parallel.spawn.run_local_ranks`)
  have it in their environment from their start (``/proc/self/environ``: before torch loads);
  a value the user set (either name torch reads) is kept, and the caller's environment is left
  as it was;
* the Slurm job script (``launcher.env``) exports it; ``launcher.env.PYTORCH_CUDA_ALLOC_CONF``
  replaces it and ``~launcher.env.PYTORCH_CUDA_ALLOC_CONF`` drops it.

Run: .venv/bin/python -m pytest tests/unit/test_alloc_conf.py
"""

import os
from pathlib import Path

import pytest

from trb_nemo.cli import main
from trb_nemo.parallel.spawn import ALLOC_CONF_DEFAULT, run_local_ranks

NAMES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def allocator_environment() -> dict:
    """In a rank: the allocator variables of its environment as the process started with it."""
    start = dict(entry.split("=", 1) for entry in
                 Path("/proc/self/environ").read_text().split("\0") if "=" in entry)
    return {k: start.get(k) for k in NAMES}


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("user", [None, ("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512"),
                                  ("PYTORCH_ALLOC_CONF", "garbage_collection_threshold:0.6")])
def test_local_ranks_get_expandable_segments_unless_the_user_set_it(monkeypatch, user):
    for name in NAMES:
        monkeypatch.delenv(name, raising=False)
    if user is not None:
        monkeypatch.setenv(*user)
    [seen] = run_local_ranks(allocator_environment, 1, timeout_s=120)
    if user is None:
        assert ALLOC_CONF_DEFAULT == ("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        assert seen == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
                        "PYTORCH_ALLOC_CONF": None}
    else:
        assert seen == {k: (user[1] if k == user[0] else None) for k in NAMES}
    assert {k: os.environ.get(k) for k in NAMES} == {  # the launcher's own: as it was
        k: (user[1] if user and k == user[0] else None) for k in NAMES}


def _exports(capsys, monkeypatch, tmp_path, *overrides) -> list[str]:
    tmp_path.mkdir()
    monkeypatch.chdir(tmp_path)
    rc = main(["launch", "slurm", "--dry-run", "recipe=paper_qwen3_1.7b",
               *overrides, f"logging.output_dir={tmp_path / 'out'}"])
    _, err = capsys.readouterr()
    assert rc == 0, err
    [script] = (tmp_path / "out").rglob("*.sbatch")
    return [line for line in script.read_text().splitlines()
            if line.startswith("export PYTORCH_")]


def test_job_script_exports_expandable_segments_and_the_user_value_wins(capsys, monkeypatch,
                                                                        tmp_path):
    assert _exports(capsys, monkeypatch, tmp_path / "default") == [
        "export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"]
    own = _exports(capsys, monkeypatch, tmp_path / "own",
                   "launcher.env.PYTORCH_CUDA_ALLOC_CONF='max_split_size_mb:512'")
    assert own == ["export PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:512"]
    assert _exports(capsys, monkeypatch, tmp_path / "none",
                    "~launcher.env.PYTORCH_CUDA_ALLOC_CONF") == []
