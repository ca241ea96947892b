"""Resuming `trb-nemo train` from damaged checkpoints and with changed settings.

One short run saves a checkpoint after each of its 5 steps; every test works on a copy of its
folder. A damaged checkpoint (a shard deleted or truncated, ``.metadata`` truncated, a rank's
state missing) is skipped with one warning line and the run resumes from the newest intact one;
when none is left, or when a setting that defines the run changed, the run stops with one line
(exit 2) before any rank starts.

Run: .venv/bin/python -m pytest tests/dist/test_checkpoint_damage.py
"""

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trb_nemo.models.megatron_io import MANIFEST, verify_checkpoint
from trb_nemo.train.run_dir import RESUME_ENV

pytestmark = pytest.mark.dist

SHORT = ["optim.max_steps=5", "trb.warmup_steps=2", "optim.prompts_per_step=4",
         "rollout.num_rollouts_per_prompt=2", "optim.micro_batch_size=4",
         "rollout.max_new_tokens=32", "eval.interval=0", "eval.num_problems=4",
         "eval.num_samples=2", "logging.progress_bar=false", "checkpoint.interval=1",
         "checkpoint.keep_last=5"]


def _command(out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "trb_nemo.cli", "train", *SHORT, f"logging.output_dir={out}",
            "logging.run_name=run", *extra]


def _children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(out: Path, *extra, timeout=600) -> tuple[subprocess.CompletedProcess, float]:
    """The command's result and the CPU seconds it used (wall time on a shared 2-core machine
    says little: a stop in the pre-flight costs ~4 CPU s, starting 2 ranks over 20)."""
    cpu = _children_cpu_s()
    proc = subprocess.run(_command(out, *extra), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, RESUME_ENV: ""})
    return proc, _children_cpu_s() - cpu


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:07d}"


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {  # name: (what is done to a checkpoint folder, what the warning names)
    "distcp-deleted": (lambda f: (f / "__0_0.distcp").unlink(), "__0_0.distcp is missing"),
    "distcp-truncated": (lambda f: truncate(f / "__1_0.distcp"), "__1_0.distcp has "),
    "metadata-truncated": (lambda f: truncate(f / ".metadata"), ".metadata has "),
    "rank-file-missing": (lambda f: (f / "rank_00001.pt").unlink(), "rank_00001.pt is missing"),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    proc, _ = _run(out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = out / "run"
    for step in range(1, 6):
        assert verify_checkpoint(step_dir(run, step)) is None
        assert (step_dir(run, step) / MANIFEST).is_file()
        assert (step_dir(run, step) / "config.yaml").is_file()
    return run


def _copy(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_preflight_skips_each_kind_of_damage(trained, tmp_path, kind, capsys, monkeypatch):
    """In-process pre-flight on a real checkpoint: the damaged newest folder is named in one
    warning line and the one before it is chosen."""
    from trb_nemo.commands.preflight import plan_resume
    from trb_nemo.config.compose import load_config
    from trb_nemo.train.run_dir import recorded_resume_choice

    monkeypatch.setenv(RESUME_ENV, "")
    run = _copy(trained, tmp_path)
    damage, named = DAMAGE[kind]
    damage(step_dir(run, 5))
    cfg = load_config([*SHORT, f"logging.output_dir={tmp_path}", "logging.run_name=run"])
    assert plan_resume(cfg) == step_dir(run, 4)
    assert recorded_resume_choice(run / "checkpoints") == (True, step_dir(run, 4))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"trb-nemo: checkpoint {step_dir(run, 5)} is damaged ({named}")
    assert err[0].endswith("resuming from step_0000004 (the damaged folder is kept as "
                           "step_0000005.damaged)")


def test_resume_falls_back_past_every_kind_of_damage(trained, tmp_path):
    """Steps 2-5 damaged, one kind each, plus an unfinished save: the run warns once per folder,
    resumes from step 1, keeps the damaged folders aside, removes the .tmp and finishes; the
    allowed change of a run-defining setting is recorded."""
    run = _copy(trained, tmp_path)
    for step, kind in zip((5, 4, 3, 2), DAMAGE.values(), strict=True):
        kind[0](step_dir(run, step))
    unfinished = run / "checkpoints" / "step_0000006.tmp"
    unfinished.mkdir()
    (unfinished / "__0_0.distcp").write_bytes(b"\0" * 100)
    proc, _ = _run(tmp_path, "optim.max_steps=3", "data.seed=3",
                   "checkpoint.allow_config_change=true")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "Traceback" not in output
    warnings = [line for line in proc.stderr.splitlines() if " is damaged (" in line]
    assert len(warnings) == 4, output
    for line, step, (_, named) in zip(warnings, (5, 4, 3, 2), DAMAGE.values(), strict=True):
        assert line.startswith(f"trb-nemo: checkpoint {step_dir(run, step)} is damaged ({named}")
        assert "resuming from step_0000001" in line
    assert f"resumed from {step_dir(run, 1)} at step 1" in output
    assert "removed step_0000006.tmp" in output
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_0000001", "step_0000002", "step_0000002.damaged", "step_0000003",
                     "step_0000003.damaged", "step_0000004.damaged", "step_0000005.damaged"]
    # the damaged folders are kept as they were, the new ones are intact
    assert not (run / "checkpoints" / "step_0000005.damaged" / "__0_0.distcp").exists()
    assert not (run / "checkpoints" / "step_0000002.damaged" / "rank_00001.pt").exists()
    for step in (2, 3):
        assert verify_checkpoint(step_dir(run, step)) is None
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if "train/loss" in r) == [0, 1, 2]
    assert (run / "report.md").is_file()
    changes = [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]
    assert [(c["step"], c["checkpoint"], c["changes"]) for c in changes] == [
        (1, "step_0000001", {"data.seed": [0, 3]})]
    assert "seed: 3" in (step_dir(run, 3) / "config.yaml").read_text()
    assert (run / "config.before_step_0000001.yaml").is_file()


def test_no_intact_checkpoint_left_stops_in_one_line(trained, tmp_path):
    run = _copy(trained, tmp_path)
    for step in range(1, 6):
        (step_dir(run, step) / "__1_0.distcp").unlink()
    proc, cpu_s = _run(tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith("trb-nemo: config error: checkpoint.dir: every checkpoint in ")
    assert "step_0000005: __1_0.distcp is missing" in proc.stderr
    assert cpu_s < 12, cpu_s  # no rank started
    assert all(step_dir(run, step).is_dir() for step in range(1, 6))  # nothing deleted


def test_changed_settings_stop_in_one_line(trained, tmp_path):
    run = _copy(trained, tmp_path)
    config = (run / "config.yaml").read_text()
    proc, cpu_s = _run(tmp_path, "loss.kind=full", "data.seed=3", "optim.max_steps=6",
                         "eval.interval=2", "checkpoint.interval=3", timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stdout + proc.stderr
    line = proc.stderr
    assert line.startswith("trb-nemo: config error: checkpoint.allow_config_change: is false, "
                           f"and resuming {step_dir(run, 5)} with other settings")
    assert "loss.kind: 'topk' -> 'full'" in line and "data.seed: 0 -> 3" in line
    assert "max_steps" not in line and "eval.interval" not in line and "checkpoint.interval" \
        not in line
    assert cpu_s < 12, cpu_s  # no rank started
    assert (run / "config.yaml").read_text() == config
    assert not (run / "config_changes.jsonl").exists()
