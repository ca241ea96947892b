"""Bad model inputs stop `trb-nemo train` / `trb-nemo convert` with one line naming the key,
before any rank starts: a wrong checkpoint path, a student/teacher vocabulary or tokenizer
mismatch, an HF architecture we do not convert. Also: HF config.json -> ModelSpec.

Run: .venv/bin/python -m pytest tests/unit/test_model_inputs.py
"""

import json

import pytest

from trb_nemo.cli import EXIT_CONFIG_ERROR, main
from trb_nemo.config.schema import ConfigError, ModelSpec
from trb_nemo.models.hf_config import hf_config_from_spec, spec_from_hf_config

QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 24, "vocab_size": 128, "max_position_embeddings": 512,
         "rope_theta": 1000000, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
         "hidden_act": "silu", "eos_token_id": 1}


def hf_folder(path, config, vocab=None):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    if vocab is not None:
        (path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab},
                                                         "added_tokens": []}))
    return str(path)


INLINE = ["model.student.checkpoint=null", "model.teacher.checkpoint=null",
          "data.source=toy_math"]
"""Networks described by the overrides, not by the shipped toy checkpoints (own models on the
toy task: said explicitly)."""


def one_line_error(capsys, argv) -> str:
    assert main(argv) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_missing_checkpoint_path(capsys, tmp_path):
    line = one_line_error(capsys, ["train", f"model.student.checkpoint={tmp_path}/nope"])
    assert line.startswith("trb-nemo: config error: model.student.checkpoint: ")
    assert "does not exist" in line


def test_folder_that_is_not_a_checkpoint(capsys, tmp_path):
    (tmp_path / "step_0000003").mkdir()
    (tmp_path / "step_0000003" / "trb_nemo_model.json").write_text("{}")
    line = one_line_error(capsys, ["train", f"model.teacher.checkpoint={tmp_path}"])
    assert "model.teacher.checkpoint:" in line and "step_0000003" in line


def test_inline_vocab_mismatch(capsys):
    line = one_line_error(capsys, ["train", *INLINE, "model.teacher.vocab_size=256"])
    assert "model.teacher.vocab_size:" in line and "share one tokenizer" in line


def test_hf_tokenizer_mismatch(capsys, tmp_path):
    s = hf_folder(tmp_path / "s", QWEN3, {"a": 0, "b": 1})
    t = hf_folder(tmp_path / "t", QWEN3, {"a": 0, "c": 1})
    line = one_line_error(capsys, ["train", *INLINE, f"model.student.hf_path={s}",
                                   f"model.teacher.hf_path={t}", "parallel=cpu_tp1"])
    assert "model.teacher.hf_path:" in line and "tokenizer differs" in line


def test_hf_vocab_size_mismatch(capsys, tmp_path):
    s = hf_folder(tmp_path / "s", QWEN3)
    t = hf_folder(tmp_path / "t", {**QWEN3, "vocab_size": 256})
    line = one_line_error(capsys, ["train", *INLINE, f"model.student.hf_path={s}",
                                   f"model.teacher.hf_path={t}", "parallel=cpu_tp1"])
    assert "model.teacher.vocab_size:" in line


@pytest.mark.parametrize("command", ["train", "convert"])
def test_unsupported_architecture(capsys, tmp_path, command):
    folder = hf_folder(tmp_path / "m", {**QWEN3, "architectures": ["MistralForCausalLM"]})
    argv = (["train", *INLINE, f"model.student.hf_path={folder}"] if command == "train" else
            ["convert", "hf-to-megatron", "--hf-path", folder, "--out", str(tmp_path / "o")])
    line = one_line_error(capsys, argv)
    assert "MistralForCausalLM" in line and "Qwen3ForCausalLM, Qwen2ForCausalLM, LlamaForCausalLM" in line


def test_unsupported_rope_scaling_and_activation(tmp_path):
    with pytest.raises(ConfigError, match="yarn"):
        spec_from_hf_config({**QWEN3, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
                            ModelSpec(), "k")
    with pytest.raises(ConfigError, match="gelu"):
        spec_from_hf_config({**QWEN3, "hidden_act": "gelu"}, ModelSpec(), "k")


def test_tp_must_divide_the_hf_heads(capsys, tmp_path):
    folder = hf_folder(tmp_path / "m", {**QWEN3, "num_key_value_heads": 1})
    line = one_line_error(capsys, ["train", *INLINE, f"model.student.hf_path={folder}",
                                   f"model.teacher.hf_path={folder}"])
    assert "parallel.tensor_model_parallel_size:" in line


def test_hf_config_round_trip():
    spec = spec_from_hf_config(QWEN3, ModelSpec(max_sequence_length=256), "k")
    assert (spec.kv_channels, spec.num_query_groups, spec.qk_layernorm, spec.qkv_bias) == (24, 2, True, False)
    assert spec.max_sequence_length == 256 and spec.tie_embeddings and spec.rotary_base == 1e6
    again = spec_from_hf_config(hf_config_from_spec(spec), ModelSpec(max_sequence_length=256), "k")
    assert again == spec
