"""`trb-nemo train` pre-flight: what cannot run here stops before any rank starts.

Run: .venv/bin/python -m pytest tests/unit/test_preflight.py
"""

import pytest

from trb_nemo.commands.preflight import preflight
from trb_nemo.config.compose import load_config
from trb_nemo.config.schema import ConfigError


def test_preflight_rejects_what_cannot_run_here(tmp_path):
    with pytest.raises(ConfigError) as err:
        preflight(load_config([f"model.student.hf_path={tmp_path}/missing",
                               "model.teacher.checkpoint=null", "data.source=toy_math"]))
    assert err.value.key == "model.student.hf_path"
    with pytest.raises(ConfigError) as err:
        preflight(load_config(["model=qwen3_8b_to_1.7b", "parallel=cpu_tp2",
                               "data.source=toy_math"]))
    assert err.value.key in ("model.transformer_impl", "model.student.hf_path")


def test_local_attention_at_long_context_on_a_gpu():
    from trb_nemo.commands.preflight import check_local_attention, local_attention_bytes

    gib = 2**30
    short = load_config(["parallel=cpu_tp1"])
    check_local_attention(short, gpu_bytes=80 * gib)  # toy context: nothing to say
    # 32 heads (Qwen3-8B-shaped teacher) / TP 2, micro batch 8, S = 1024 + 7168
    long = load_config(["parallel=cpu_tp2", "model.transformer_impl=local",
                        "model.teacher.num_attention_heads=32", "model.teacher.hidden_size=4096",
                        "optim.micro_batch_size=8", "optim.prompts_per_step=8",
                        "data.max_prompt_length=1024", "rollout.max_new_tokens=7168",
                        "model.student.max_sequence_length=8192",
                        "model.teacher.max_sequence_length=8192"])
    assert local_attention_bytes(long) == 2 * 4 * 8 * 16 * 8192 * 8192
    with pytest.raises(ConfigError) as err:
        check_local_attention(long, gpu_bytes=80 * gib)
    assert err.value.key == "model.transformer_impl" and "transformer_engine" in err.value.reason
    medium = load_config(["parallel=cpu_tp1", "optim.micro_batch_size=1", "optim.prompts_per_step=8",
                          "data.max_prompt_length=1024", "rollout.max_new_tokens=4096",
                          "model.student.max_sequence_length=8192",
                          "model.teacher.max_sequence_length=8192"])
    with pytest.warns(UserWarning, match="transformer_impl=local at S=5120"):
        check_local_attention(medium, gpu_bytes=80 * gib)
