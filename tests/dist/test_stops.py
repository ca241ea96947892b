"""Stops and kills of a local `trb-nemo train` (2 gloo ranks started by the launcher):

* SIGUSR1, then SIGTERM, each sent to the launcher after a periodic checkpoint save: the run
  finishes its step, saves and exits 0; rerunning finishes equal to an uninterrupted run;
* a first Ctrl-C (SIGINT to the launcher's process group, as a terminal sends it) does the same;
  a second one stops at once (exit 130, no traceback, no rank left); the rerun resumes from the
  last complete checkpoint and finishes equal to an uninterrupted run;
* a second start on the run folder of a live run exits 2 with one line naming the holder;
* SIGKILL of the launcher leaves no rank (nor a rank's helper process) alive, and no lock.

Run: .venv/bin/python -m pytest tests/dist/test_stops.py
"""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from trb_nemo.commands.train import EXIT_STOPPED
from trb_nemo.models.folders import MODEL_META

pytestmark = [pytest.mark.dist, pytest.mark.slow]

STEPS, INTERVAL = 10, 2
SHORT = [f"optim.max_steps={STEPS}", "trb.warmup_steps=2", "optim.prompts_per_step=4",
         "rollout.num_rollouts_per_prompt=2", "optim.micro_batch_size=4",
         "rollout.max_new_tokens=16", "eval.interval=0", "eval.num_problems=4",
         "eval.num_samples=2", "logging.progress_bar=false", f"checkpoint.interval={INTERVAL}"]
TIMING_KEYS = ("seconds", "per_second", "time/")


def _command(out: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "trb_nemo.cli", "train", *SHORT, f"logging.output_dir={out}",
            f"logging.run_name={name}"]


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n"):  # a line being written is not a row yet
            rows.append(json.loads(line))
    return rows


def _deterministic(rows):
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING_KEYS)} for r in rows]


def _last_train_step(run_dir: Path) -> int:
    return max((r["step"] for r in _rows(run_dir) if "train/loss" in r), default=-1)


class Run:
    """`trb-nemo train` in its own session (like a shell job), output to a file."""

    def __init__(self, out: Path, name: str):
        self.run_dir = out / name
        self.log_path = out / f"{name}.{time.monotonic_ns()}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(_command(out, name), stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.pid = self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_for_train_row(self, step: int, timeout: float = 300) -> None:
        """Until metrics.jsonl holds the train row of `step` (steps 0..step are done)."""
        deadline = time.monotonic() + timeout
        while _last_train_step(self.run_dir) < step:
            if self.proc.poll() is not None:
                pytest.fail(f"the run exited ({self.proc.returncode}) before step {step}:\n"
                            + self.output())
            if time.monotonic() > deadline:
                self.kill_tree()
                pytest.fail(f"no train row {step} within {timeout} s:\n" + self.output())
            time.sleep(0.1)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            pytest.fail(f"the run did not exit within {timeout} s:\n" + self.output())

    def kill_tree(self) -> None:
        _kill_tree(self.proc)


def _kill_tree(proc: subprocess.Popen) -> None:
    """Test cleanup: a live process and everything it started, by pid."""
    procs = []
    if proc.poll() is None:
        try:
            procs = [psutil.Process(proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def _tree(procs: list[psutil.Process]) -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of the processes that still exist."""
    tree = {}
    for p in procs:
        try:
            tree[p.pid] = (p.ppid(), " ".join(p.cmdline()))
        except psutil.NoSuchProcess:
            pass
    return tree


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_gone(procs: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    while _alive(procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(procs)


def _next_save_after(step: int) -> int:
    return (step // INTERVAL + 1) * INTERVAL


def _stopped_with_checkpoint(run: Run, sig: int, after: int) -> int:
    """The run exited with EXIT_STOPPED (not 0: `train ... && next` must not go on) after a
    signal, with a complete checkpoint of the step it stopped at."""
    rc = run.wait()
    out = run.output()
    assert rc == EXIT_STOPPED, out
    assert f"(signal {sig})" in out and "rerun the same command to resume" in out, out
    assert "Traceback" not in out, out
    stopped_at = _last_train_step(run.run_dir) + 1
    assert after < stopped_at < STEPS, f"stopped at {stopped_at}:\n{out}"
    checkpoints = run.run_dir / "checkpoints"
    assert (checkpoints / f"step_{stopped_at:07d}" / MODEL_META).is_file(), \
        sorted(os.listdir(checkpoints))
    assert not list(checkpoints.glob("*.tmp")), sorted(os.listdir(checkpoints))
    return stopped_at


def _finish_and_compare(out: Path, name: str, baseline: Path) -> str:
    done = subprocess.run(_command(out, name), capture_output=True, text=True, timeout=600)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text
    assert "resumed from" in text and f"done, {STEPS} steps" in text, text
    assert _deterministic(_rows(out / name)) == _deterministic(_rows(baseline))
    return text


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    subprocess.run(_command(out, "straight"), check=True, timeout=600, capture_output=True)
    assert _last_train_step(out / "straight") == STEPS - 1
    return out / "straight"


def test_usr1_then_term_after_periodic_saves_then_resume(baseline, tmp_path):
    """Each signal arrives after a periodic save of the same process (the second save of a
    process used to crash: the signal had also killed dist_checkpointing's helper process)."""
    after = INTERVAL - 1  # the train row of step INTERVAL-1 is written before that save ...
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        run = Run(tmp_path, "stopped")
        run.wait_for_train_row(after + 1)  # ... the next row after it: the save is complete
        os.kill(run.pid, sig)
        stopped_at = _stopped_with_checkpoint(run, int(sig), after + 1)
        after = _next_save_after(stopped_at) - 1
    text = _finish_and_compare(tmp_path, "stopped", baseline)
    assert f"at step {stopped_at}" in text


def test_first_ctrl_c_checkpoints_second_stops_at_once(baseline, tmp_path):
    run = Run(tmp_path, "ctrl_c")
    run.wait_for_train_row(INTERVAL)
    os.killpg(run.pid, signal.SIGINT)  # a terminal's Ctrl-C: the foreground process group
    stopped_at = _stopped_with_checkpoint(run, int(signal.SIGINT), INTERVAL)

    run = Run(tmp_path, "ctrl_c")
    run.wait_for_train_row(_next_save_after(stopped_at))
    ranks = run.descendants()
    os.killpg(run.pid, signal.SIGINT)
    time.sleep(0.3)
    os.killpg(run.pid, signal.SIGINT)
    t0 = time.monotonic()
    rc = run.wait(timeout=60)
    took = time.monotonic() - t0
    out = run.output()
    assert rc == 130, out
    assert took < 10, f"{took:.1f} s after the second Ctrl-C:\n{out}"
    assert "Traceback" not in out and "second Ctrl-C" in out.splitlines()[-1], out
    assert not _wait_gone(ranks, 5), _tree(_alive(ranks))

    text = _finish_and_compare(tmp_path, "ctrl_c", baseline)
    assert "resumed from" in text


def test_a_live_run_holds_its_folder_and_dies_whole_with_the_launcher(tmp_path):
    """A second start on the folder of a live run exits 2 with one line naming it; SIGKILL of
    the launcher then leaves no rank (nor a rank's helper process) alive, and no stale lock."""
    run = Run(tmp_path, "live")
    started: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 300
        while True:  # until each rank runs the trainer, which starts a helper process first
            tree = _tree(run.descendants())
            ranks = {pid for pid, (ppid, cmd) in tree.items()
                     if ppid == run.pid and "resource_tracker" not in cmd}
            with_helpers = {ppid for ppid, _ in tree.values() if ppid in ranks}
            if len(ranks) == 2 and with_helpers == ranks:
                break
            assert run.proc.poll() is None and time.monotonic() < deadline, (tree, run.output())
            time.sleep(0.2)

        second = subprocess.Popen(_command(tmp_path, "live"), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = second.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            _kill_tree(second)
            pytest.fail("the second start ran instead of refusing")
        assert second.returncode == 2, out + err
        assert err.count("\n") == 1, err
        assert f"in use by pid {run.pid} on host" in err and "logging.run_name" in err, err

        started = run.descendants()
        os.kill(run.pid, signal.SIGKILL)
        run.proc.wait(timeout=10)
        left = _wait_gone(started, 5)
        assert not left, _tree(left)
        with open(run.run_dir / ".lock", "a") as f:  # the kernel dropped the dead run's lock
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        _kill_tree(run.proc)
        for p in _alive(started):
            p.kill()
