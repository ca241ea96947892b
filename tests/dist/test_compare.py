"""`trb-nemo compare` end to end: two methods x two seeds x a few steps, killed (SIGKILL of the
whole process group) after its first run finished and started again: the finished run is not
redone, the others complete, and the table has standard errors and a paired interval against
vanilla OPD; the plot is written.

Run: .venv/bin/python -m pytest tests/dist/test_compare.py
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.dist

SMALL = ["parallel=cpu_tp1", "optim.max_steps=2", "eval.interval=1", "eval.num_problems=6",
         "eval.num_samples=2", "rollout.max_new_tokens=8", "eval.max_new_tokens=8",
         "optim.prompts_per_step=2", "rollout.num_rollouts_per_prompt=2",
         "optim.micro_batch_size=2", "trb.warmup_steps=1", "logging.progress_bar=false"]


def _command(out: Path) -> list[str]:
    exe = Path(sys.executable).with_name("trb-nemo")
    return [str(exe), "compare", *SMALL, f"logging.output_dir={out}", "--methods", "student",
            "trb", "--seeds", "0", "1"]


def test_compare_killed_and_resumed(tmp_path):
    first = tmp_path / "compare" / "student-seed0" / "report.md"
    proc = subprocess.Popen(_command(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not first.is_file():
            assert proc.poll() is None, "compare ended before its first run finished"
            assert time.monotonic() < deadline, "the first run did not finish in time"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = (first.parent / "metrics.jsonl").read_text()
    assert not (tmp_path / "compare" / "table.md").exists()

    done = subprocess.run(_command(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "compare/student-seed0\n" not in done.stdout  # not redone
    assert (first.parent / "metrics.jsonl").read_text() == finished
    for name in ("student-seed1", "trb-seed0", "trb-seed1"):
        assert (tmp_path / "compare" / name / "report.md").is_file(), name
    table = (tmp_path / "compare" / "table.md").read_text()
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| Method")}
    assert set(rows) == {"Vanilla OPD", "TRB (ours)"}
    assert " ± " in rows["Vanilla OPD"][3] and rows["Vanilla OPD"][4] == "-"
    delta = rows["TRB (ours)"][4]  # "+x.x [lo, hi]"
    lo, hi = (float(v) for v in delta.split("[")[1].rstrip("]").split(","))
    assert lo <= float(delta.split(" [")[0]) <= hi
    assert (tmp_path / "compare" / "pass_at_1.png").stat().st_size > 1000
