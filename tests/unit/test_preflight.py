"""`trb-nemo train` pre-flight: what cannot run here stops before any rank starts.

Run: .venv/bin/python -m pytest tests/unit/test_preflight.py
"""

import pytest

from trb_nemo.config.compose import load_config
from trb_nemo.config.schema import ConfigError
from trb_nemo.train.preflight import preflight


def test_preflight_rejects_what_cannot_run_here(tmp_path):
    with pytest.raises(ConfigError) as err:
        preflight(load_config([f"model.student.hf_path={tmp_path}/missing"]))
    assert err.value.key == "model.student.hf_path"
    with pytest.raises(ConfigError) as err:
        preflight(load_config(["model=qwen3_8b_to_1.7b", "parallel=cpu_tp2"]))
    assert err.value.key in ("model.transformer_impl", "model.student.hf_path")
