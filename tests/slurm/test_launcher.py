"""`trb-nemo launch slurm` against a real local Slurm (scripts/slurm_local.sh: a controller and
two emulated nodes): a 2-node x 1-task gloo run completes with metrics; chained stages run the
OPD stage after the warmup and resume its checkpoint; a job sent its warning signal
checkpoints, requeues itself and finishes; an override with spaces, quotes and $(...) arrives
verbatim and runs nothing; --dry-run renders the directives and the srun line.

Run: .venv/bin/python -m pytest tests/slurm (root; installs Slurm from Debian packages once)
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "slurm_local.sh"
PREFIX = "/tmp/trb-nemo-slurm"
TINY = ["launcher.nodes=2", "launcher.gpus_per_node=0", "launcher.tasks_per_node=1",
        "launcher.time_limit=00:10:00", "parallel=cpu_tp2", "optim.prompts_per_step=4",
        "rollout.num_rollouts_per_prompt=2", "optim.micro_batch_size=4",
        "rollout.max_new_tokens=32", "eval.interval=0", "eval.num_problems=4",
        "eval.num_samples=1", "logging.progress_bar=false", "checkpoint.interval=0"]


def _launch(*overrides, env=None, dry_run=False):
    cmd = [sys.executable, "-m", "trb_nemo.cli", "launch", "slurm", *(["--dry-run"] if dry_run else []),
           *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, **(env or {})})


def test_dry_run_renders_directives_and_srun_line(tmp_path):
    secret = "s3cr3t-value-never-written"
    out = _launch("launcher.nodes=4", "launcher.gpus_per_node=8", "launcher.partition=batch",
                  "launcher.account=proj", "launcher.container_image=nvcr.io/org/trb:1",
                  "launcher.container_mounts=[/data:/data]", "launcher.env_passthrough=[HF_TOKEN]",
                  "model=qwen3_8b_to_1.7b", "parallel=gpu_tp2", "data.source=toy_math",
                  f"logging.output_dir={tmp_path}",
                  dry_run=True,
                  env={"HF_TOKEN": secret})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", text, flags=re.M))
    assert directives["nodes"] == "4" and directives["ntasks-per-node"] == "8"
    assert directives["gpus-per-node"] == "8" and directives["partition"] == "batch"
    assert directives["account"] == "proj" and directives["signal"] == "B:USR1@300"
    assert "requeue" in directives
    srun = re.search(r"^srun .*\n.*$", text, flags=re.M).group(0)
    assert "--container-image=nvcr.io/org/trb:1" in srun and "--container-mounts=/data:/data" in srun
    assert "--container-env=HF_TOKEN" in srun and '"${ARGS[@]}"' in srun
    assert secret not in text and 'HF_TOKEN:?' in text
    assert "  model=qwen3_8b_to_1.7b\n" in text


def test_dry_run_chained_stages(tmp_path):
    out = _launch("launcher.stages=chained", "launcher.stage2_overrides=['parallel=gpu_tp4_pp2']",
                  "launcher.stage2_nodes=2", f"logging.output_dir={tmp_path}", dry_run=True)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.split("#!/bin/bash")[1:]
    assert "  optim.max_steps=50\n" in first and "--job-name=trb-nemo-warmup" in first
    assert "  parallel=gpu_tp4_pp2\n" in second and "#SBATCH --nodes=2" in second


def test_bad_launcher_config_is_one_line():
    out = _launch("launcher.stages=chained", "rollout.behavior=student", dry_run=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "launcher.stages:" in out.stderr


# ------------------------------------------------------------------------- real Slurm jobs


@pytest.fixture(scope="module")
def slurm():
    if os.geteuid() != 0 or shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("the local Slurm needs root and Debian packages")
    up = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stderr
    env = {"SLURM_CONF": f"{PREFIX}/etc/slurm.conf"}
    yield env
    subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, timeout=120)


def _job_ids(stdout: str) -> list[str]:
    return re.findall(r"as job (\d+)", stdout)


def _wait(job: str, env, seconds=420) -> str:
    out = subprocess.run(["bash", str(SCRIPT), "wait", job, str(seconds)], capture_output=True,
                         text=True, env={**os.environ, **env}, timeout=seconds + 30)
    return out.stdout.strip()


def _rows(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slurm
def test_two_node_run_with_a_hostile_override(slurm, tmp_path):
    marker = tmp_path / "pwned"
    name = f"a b '$(touch {marker})' `touch {marker}`"
    out = _launch(*TINY, "optim.max_steps=2", f"logging.output_dir={tmp_path}",
                  f'logging.run_name="{name}"', env=slurm)
    assert out.returncode == 0, out.stderr
    [job] = _job_ids(out.stdout)
    assert _wait(job, slurm) == "COMPLETED"
    run_dir = tmp_path / name
    rows = _rows(run_dir)
    assert [r["step"] for r in rows if "train/loss" in r] == [0, 1]
    from omegaconf import OmegaConf

    assert OmegaConf.load(run_dir / "config.yaml").logging.run_name == name  # verbatim
    assert not marker.exists()
    log = next((run_dir / "slurm").glob("*.out")).read_text()
    assert "0: " in log and "trb-nemo: done" in log


@pytest.mark.slurm
def test_chained_stages_resume_the_warmup_checkpoint(slurm, tmp_path):
    out = _launch(*TINY, "launcher.stages=chained", "trb.warmup_steps=2", "optim.max_steps=3",
                  f"logging.output_dir={tmp_path}", "logging.run_name=chain", env=slurm)
    assert out.returncode == 0, out.stderr
    first, second = _job_ids(out.stdout)
    assert _wait(second, slurm) == "COMPLETED"
    assert _wait(first, slurm, 5) == "COMPLETED"
    run_dir = tmp_path / "chain"
    logs = {p.name.split("-")[2]: p.read_text() for p in (run_dir / "slurm").glob("*.out")}
    opd_log = logs["opd"] if "opd" in logs else "".join(logs.values())
    assert "resumed from" in opd_log and "step_0000002" in opd_log
    train = [r for r in _rows(run_dir) if "train/loss" in r]
    assert [r["step"] for r in train] == [0, 1, 2]
    assert [r["scoring/teacher_passes"] for r in train] == [0, 0, 1]


@pytest.mark.slurm
def test_warning_signal_after_a_periodic_save_requeues_and_finishes(slurm, tmp_path):
    """USR1 (Slurm's warning before the time limit) after a periodic checkpoint: the job
    checkpoints, requeues itself and finishes at the right step, resuming from the checkpoint
    saved after the signal. srun has slurmstepd signal every process of the step, Megatron's
    checkpoint helper process included; the save that follows the signal must still work. (A
    signal with no checkpoint yet takes the same path; tests/dist/test_stops.py covers the
    in-process stop at every phase.)"""
    overrides = [o for o in TINY if not o.startswith("checkpoint.interval=")]
    out = _launch(*overrides, "checkpoint.interval=2", "optim.max_steps=6",
                  "launcher.signal_seconds_before_end=60", f"logging.output_dir={tmp_path}",
                  "logging.run_name=preempt_late", env=slurm)
    assert out.returncode == 0, out.stderr
    [job] = _job_ids(out.stdout)
    run_dir = tmp_path / "preempt_late"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # the train row after step 2's periodic save
        if (run_dir / "metrics.jsonl").is_file() and any(
                r.get("step") == 2 and "train/loss" in r for r in _rows(run_dir)):
            break
        time.sleep(0.5)
    else:
        pytest.fail("no train row 2 within 300 s")
    env = {**os.environ, **slurm}
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, env=env)
    state = _wait(job, slurm)
    logs = "".join(p.read_text() for p in sorted((run_dir / "slurm").glob("*.out")))
    errors = "".join(p.read_text() for p in sorted((run_dir / "slurm").glob("*.err")))
    assert state == "COMPLETED", logs + errors
    info = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True,
                          env=env).stdout
    assert re.search(r"Restarts=[1-9]", info), info
    assert "requeueing job" in logs and "done, 6 steps" in logs, logs + errors
    resumed = re.search(r"resumed from \S+step_(\d{7}) at step (\d+)", logs)
    assert resumed and int(resumed.group(2)) > 2, logs  # the checkpoint saved after the signal
    assert "BrokenPipeError" not in logs + errors
    train = [r for r in _rows(run_dir) if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(6))
    assert (run_dir / "checkpoints" / "step_0000006").is_dir()
