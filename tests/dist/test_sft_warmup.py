"""The SFT-warmup baseline: one command fine-tunes the student for S updates on the teacher's
responses to exactly the prompts of the first N OPD steps, then runs OPD from those weights.

Run: .venv/bin/python -m pytest tests/dist/test_sft_warmup.py
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness import spawn_bare

pytestmark = pytest.mark.dist

SMALL = ["parallel=cpu_tp1", "rollout.behavior=sft_warmup", "sft.updates=3", "sft.prompt_steps=2",
         "sft.lr=1e-3", "sft.lr_warmup_steps=1", "optim.max_steps=2", "eval.interval=0",
         "eval.num_problems=4", "eval.num_samples=1", "rollout.max_new_tokens=8",
         "eval.max_new_tokens=8", "optim.prompts_per_step=2", "rollout.num_rollouts_per_prompt=2",
         "optim.micro_batch_size=2", "logging.progress_bar=false"]


def _stage_sees_the_opd_prompts_and_the_teacher(overrides):
    """In a rank: the first stage's prompts of update u are OPD step (u mod N)'s, drawn by the
    teacher's own policy; its loss batch trains on those tokens."""
    from trb_nemo.commands.train import stage_config
    from trb_nemo.config.compose import load_config
    from trb_nemo.methods.policies import TeacherPolicy
    from trb_nemo.methods.table import policy_for
    from trb_nemo.train.trainer import Trainer

    cfg = load_config(overrides)
    first = stage_config(cfg, "sft")
    opd = Trainer(cfg)
    opd_prompts = [[p.ids for p in opd.prompts(k)] for k in range(2)]
    from trb_nemo.parallel import groups

    groups.destroy()
    stage = Trainer(first)
    out = {"same_prompts": [[p.ids for p in stage.prompts(u)] == opd_prompts[u % 2]
                            for u in range(3)],
           "policy": type(policy_for(0, first.rollout, first.trb)).__name__,
           "teacher_at_t1": policy_for(0, first.rollout, first.trb) == TeacherPolicy(1.0),
           "lr": first.optim.lr, "updates": first.optim.max_steps}
    groups.destroy()
    return out


def test_first_stage_data_are_the_teachers_answers_to_the_opd_prompts(tmp_path):
    out = spawn_bare(_stage_sees_the_opd_prompts_and_the_teacher, 1,
                     [*SMALL, f"logging.output_dir={tmp_path}"])[0]
    assert out["same_prompts"] == [True, True, True]
    assert out["policy"] == "TeacherPolicy" and out["teacher_at_t1"]
    assert out["lr"] == 1e-3 and out["updates"] == 3


def test_one_command_runs_sft_then_opd_from_its_weights(tmp_path):
    exe = Path(sys.executable).with_name("trb-nemo")
    done = subprocess.run([str(exe), "train", *SMALL, f"logging.output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    opd = tmp_path / "sft_warmup-toy-student-from-toy-teacher"  # the default run name
    stage = opd.with_name(opd.name + "-sft")
    stage_rows = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    updates = [r for r in stage_rows if "train/loss" in r]
    assert [r["step"] for r in updates] == [0, 1, 2]  # S updates
    assert all(r["rollout/teacher_forwards"] > 0 for r in updates)  # the teacher decoded
    weights = stage / "checkpoints" / "step_0000003"
    assert weights.is_dir()
    assert f"checkpoint: {weights}" in (opd / "config.yaml").read_text()
    opd_rows = [json.loads(x) for x in (opd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in opd_rows if "train/loss" in r] == [0, 1]
    assert (opd / "report.md").read_text().count("Method `sft_warmup`") == 1
    # again: both stages are finished, nothing is redone
    again = subprocess.run([str(exe), "train", *SMALL, f"logging.output_dir={tmp_path}"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "first stage `sft`" not in again.stdout
    assert (stage / "metrics.jsonl").read_text().count("train/loss") == 3
