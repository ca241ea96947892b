"""A stop signal that arrives inside a long phase lands there, not after it: on a cluster a
rollout or an evaluation outlasts Slurm's warning, so waiting for the end of the step would lose
the checkpoint. A local `trb-nemo train` (2 gloo ranks, TP=2) decodes one sequence at a time so
that its rollouts and evaluations last seconds:

* SIGTERM inside step 1's rollout: the run exits with EXIT_STOPPED before step 1 finished (no
  train row of step 1) and saved the state before it (``step_0000001``); rerunning finishes
  equal to an uninterrupted run;
* SIGTERM inside the final evaluation: exit EXIT_STOPPED with that evaluation not logged and
  the last step's checkpoint saved with the evaluation pending; rerunning evaluates that step
  first and finishes equal to an uninterrupted run.

Run: .venv/bin/python -m pytest tests/dist/test_stop_in_long_phases.py
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trb_nemo.commands.train import EXIT_STOPPED
from trb_nemo.models.folders import MODEL_META

pytestmark = [pytest.mark.dist, pytest.mark.slow]

SLOW_PHASES = ["rollout.behavior=student", "optim.max_steps=2", "optim.prompts_per_step=1",
               "rollout.num_rollouts_per_prompt=16", "optim.micro_batch_size=8",
               "rollout.max_new_tokens=48", "rollout.max_sequences_in_flight=1",
               "eval.interval=0", "eval.num_problems=4", "eval.num_samples=4",
               "eval.max_sequences_in_flight=1", "logging.progress_bar=false",
               "checkpoint.interval=0"]
TIMING = ("seconds", "per_second", "time/")


def _command(out: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "trb_nemo.cli", "train", *SLOW_PHASES,
            f"logging.output_dir={out}", f"logging.run_name={name}"]


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True)
            if line.endswith("\n")]


def _deterministic(rows):
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def _start(out: Path, name: str) -> subprocess.Popen:
    log = open(out / f"{name}.log", "w")  # noqa: SIM115 - the run outlives this function
    return subprocess.Popen(_command(out, name), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _until(what, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight")
    subprocess.run(_command(out, "s"), check=True, timeout=600, capture_output=True)
    return out / "s"


def _stop_and_resume(out: Path, name: str, inside, straight: Path):
    """Start the run, SIGTERM it once ``inside(run folder)`` holds (plus a moment), check it
    stopped with EXIT_STOPPED, rerun it to the end and compare with ``straight``. Returns (the
    seconds from the signal to the exit, the stopped run's output, its metrics rows then)."""
    proc = _start(out, name)
    run = out / name
    _until(lambda: inside(run) or proc.poll() is not None)
    time.sleep(1.5)  # well inside the phase (it lasts several seconds)
    sent = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    code = proc.wait(timeout=300)
    latency = time.monotonic() - sent
    log = (out / f"{name}.log").read_text()
    assert code == EXIT_STOPPED, log
    rows_at_stop = _rows(run)
    resumed = subprocess.run(_command(out, name), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _deterministic(_rows(run)) == _deterministic(_rows(straight))
    return latency, log, rows_at_stop


def _progress(folder: Path) -> dict:
    return torch.load(folder / "rank_00000.pt", weights_only=False)["progress"]


def _straight_seconds(straight: Path, key: str, step: int) -> float:
    return next(r[key] for r in _rows(straight) if r.get("step") == step and key in r)


def test_a_stop_inside_a_rollout_saves_before_that_step_and_resumes_exactly(straight,
                                                                            tmp_path):
    def in_step_1_rollout(run):  # step 0's train row is written: step 1 is decoding
        return any("train/loss" in r and r["step"] == 0 for r in _rows(run))

    latency, log, rows = _stop_and_resume(tmp_path, "r", in_step_1_rollout, straight)
    assert "signal 15: saved step 1" in log, log
    assert not any("train/loss" in r and r["step"] == 1 for r in rows)  # step 1 never finished
    folder = tmp_path / "r" / "checkpoints" / "step_0000001"
    assert (folder / MODEL_META).is_file() and not _progress(folder)["eval_pending"]
    # bounded: well under what finishing the rollout, the step and the final evaluation takes
    rest = _straight_seconds(straight, "time/step_seconds", 1)
    assert latency < rest + 20, (latency, rest)


def test_a_stop_inside_an_evaluation_saves_it_as_pending_and_resumes_exactly(straight,
                                                                             tmp_path):
    def in_final_evaluation(run):  # the last step's train row is written: it evaluates
        return any("train/loss" in r and r["step"] == 1 for r in _rows(run))

    latency, log, rows = _stop_and_resume(tmp_path, "e", in_final_evaluation, straight)
    assert "signal 15: saved step 2" in log, log
    assert not any("eval/pass@1" in r and r["step"] == 2 for r in rows)  # it never finished
    folder = tmp_path / "e" / "checkpoints" / "step_0000002"
    assert (folder / MODEL_META).is_file() and _progress(folder)["eval_pending"]
    assert latency < 60, latency
