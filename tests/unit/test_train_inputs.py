"""Bad inputs stop `trb-nemo train` before training with one clear line: an empty or malformed
prompt file, a prompt longer than the context, a distillation behavior without a teacher, a
batch that does not split into microbatches.

Run: .venv/bin/python -m pytest tests/unit/test_train_inputs.py
"""

import json

import pytest
from cli_inputs import write_placeholder_weights, write_word_tokenizer

from trb_nemo.cli import EXIT_CONFIG_ERROR, main

QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 128, "max_position_embeddings": 512, "hidden_act": "silu",
         "eos_token_id": 1}


@pytest.fixture(scope="module")
def hf_with_tokenizer(tmp_path_factory):
    """An HF folder with a config.json and a word-level tokenizer `transformers` loads."""

    folder = tmp_path_factory.mktemp("hf")
    write_word_tokenizer(folder, "what is one two three plus".split())
    (folder / "config.json").write_text(json.dumps(QWEN3))
    write_placeholder_weights(folder)
    return str(folder)


def one_line_error(capsys, argv) -> str:
    assert main(argv) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _run(capsys, hf, prompts_file, *extra):
    return one_line_error(capsys, ["train", "model.student.checkpoint=null",
                                   "model.teacher.checkpoint=null", f"model.student.hf_path={hf}",
                                   f"model.teacher.hf_path={hf}", "parallel=cpu_tp1",
                                   f"data.source={prompts_file}", *extra])


def test_empty_prompt_file(capsys, tmp_path, hf_with_tokenizer):
    (tmp_path / "p.jsonl").write_text("\n\n")
    line = _run(capsys, hf_with_tokenizer, tmp_path / "p.jsonl")
    assert "data.source:" in line and "has no prompts" in line


def test_malformed_prompt_line(capsys, tmp_path, hf_with_tokenizer):
    (tmp_path / "p.jsonl").write_text('{"prompt": "one plus two", "answer": "3"}\n{"prompt": oops\n')
    line = _run(capsys, hf_with_tokenizer, tmp_path / "p.jsonl")
    assert "data.source:" in line and "p.jsonl:2: not valid JSON" in line


def test_missing_prompt_key(capsys, tmp_path, hf_with_tokenizer):
    (tmp_path / "p.jsonl").write_text('{"question": "one plus two"}\n')
    line = _run(capsys, hf_with_tokenizer, tmp_path / "p.jsonl")
    assert "data.prompt_key:" in line and "'prompt'" in line


def test_prompt_longer_than_the_context(capsys, tmp_path, hf_with_tokenizer):
    rows = [{"prompt": "one plus two", "answer": "3"}, {"prompt": " ".join(["one"] * 40)}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    line = _run(capsys, hf_with_tokenizer, tmp_path / "p.jsonl", "data.max_prompt_length=16")
    assert "data.max_prompt_length:" in line and "p.jsonl:2: prompt has 40 tokens" in line


def test_missing_prompt_file(capsys, tmp_path, hf_with_tokenizer):
    line = _run(capsys, hf_with_tokenizer, tmp_path / "nope.jsonl")
    assert "data.source:" in line and "neither toy_math nor a file" in line


def test_trb_without_a_teacher(capsys):
    line = one_line_error(capsys, ["train", "model.teacher=null"])
    assert "model.teacher:" in line and "rollout.behavior=trb" in line


def test_microbatches_must_divide_the_batch(capsys):
    line = one_line_error(capsys, ["train", "optim.micro_batch_size=7"])
    assert "optim.micro_batch_size:" in line and "64 sequences" in line
