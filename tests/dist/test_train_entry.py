"""`trb-nemo train` on its embedded default: local ranks start, both models build at TP=2.

Run: .venv/bin/python -m pytest tests/dist/test_train_entry.py
"""

import math

import pytest

from trb_nemo.config.compose import load_config
from trb_nemo.config.schema import ConfigError
from trb_nemo.train.entry import run_train
from trb_nemo.train.preflight import preflight

pytestmark = pytest.mark.dist


def test_default_run_starts_two_ranks_and_checks_the_stack():
    results = run_train(load_config())
    assert len(results) == 2
    r0, r1 = results
    assert r0["loss"] == r1["loss"] and math.isfinite(r0["loss"])  # TP ranks agree
    assert not r0["teacher_has_grads"] and not r1["teacher_has_grads"]
    # TP=2 halves the sharded weights: both ranks hold the same number of parameters
    assert r0["student_params_local"] == r1["student_params_local"] > 0
    assert r0["local_grad_sq"] > 0


def test_preflight_rejects_what_cannot_run_here(tmp_path):
    with pytest.raises(ConfigError) as err:
        preflight(load_config([f"model.student.hf_path={tmp_path}/missing"]))
    assert err.value.key == "model.student.hf_path"
    with pytest.raises(ConfigError) as err:
        preflight(load_config(["model=qwen3_8b_to_1.7b", "parallel=cpu_tp2"]))
    assert err.value.key in ("model.transformer_impl", "model.student.hf_path")
