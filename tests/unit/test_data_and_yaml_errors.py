"""Issue 14, items 9-11: a prompt file without answers, a file that is one JSON array and a
student folder without a tokenizer stop `trb-nemo train` with one line before any rank starts;
a warmup longer than the run warns in one line; a wrong type or a syntax error in a user's own
YAML (``--config-dir``/``--config-name`` or a group file) is one line with the file and line;
the report says what was evaluated, shows what the behavior did, and lists config changes.

Run: .venv/bin/python -m pytest tests/unit/test_data_and_yaml_errors.py
"""

import json
import shutil
from pathlib import Path

import pytest
from cli_inputs import one_line_error, write_placeholder_weights, write_word_tokenizer

from trb_nemo.cli import main
from trb_nemo.config.compose import default_config_dir, load_config


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny Qwen3 HF folder (``transformers``) with a word-level tokenizer."""
    import transformers

    folder = tmp_path_factory.mktemp("hf")
    transformers.Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=8, max_position_embeddings=256, eos_token_id=1,
                             architectures=["Qwen3ForCausalLM"]).save_pretrained(folder)
    write_word_tokenizer(folder, "what is one two three plus".split())
    write_placeholder_weights(folder)
    return str(folder)


def train_on(capsys, hf, data, *extra) -> str:
    """The README's form on the default preset: the folders from the command line."""
    return one_line_error(capsys, ["train", f"model.student.hf_path={hf}",
                                   f"model.teacher.hf_path={hf}", f"data.source={data}", *extra])


# ------------------------------------------------------------------------------------- item 9


def test_prompt_file_without_answers(capsys, tmp_path, student, no_ranks):
    (tmp_path / "p.jsonl").write_text('{"prompt": "one plus two", "answer": "3"}\n'
                                      '{"prompt": "two plus two", "solution": "4"}\n')
    line = train_on(capsys, student, tmp_path / "p.jsonl")
    assert line.startswith("data.answer_key: ") and "p.jsonl:2: no field 'answer'" in line
    assert "'solution'" in line  # what the line has instead


def test_prompt_file_that_is_one_json_array(capsys, tmp_path, student, no_ranks):
    rows = [{"prompt": "one plus two", "answer": "3"}, {"prompt": "two plus one", "answer": "3"}]
    for name, text in (("one_line.json", json.dumps(rows)),
                       ("pretty.json", json.dumps(rows, indent=2))):
        (tmp_path / name).write_text(text)
        line = train_on(capsys, student, tmp_path / name)
        assert line.startswith("data.source: ") and "is one JSON array, not JSONL" in line


def test_student_folder_without_a_tokenizer(capsys, tmp_path, student, no_ranks):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(Path(student) / "config.json", bare / "config.json")
    write_placeholder_weights(bare)
    (tmp_path / "p.jsonl").write_text('{"prompt": "one plus two", "answer": "3"}\n')
    line = one_line_error(capsys, ["train", f"model.student.hf_path={bare}",
                                   f"model.teacher.hf_path={bare}",
                                   f"data.source={tmp_path / 'p.jsonl'}"])
    assert line.startswith("model.student.hf_path: ") and "has no tokenizer" in line


# ------------------------------------------------- issue 15: bad data files, train and eval


@pytest.fixture
def no_ranks_anywhere(no_ranks, monkeypatch):
    """Neither `trb-nemo train` nor `trb-nemo eval` may start a rank (errors come before)."""
    import trb_nemo.parallel.spawn as spawn

    def refuse(*args, **kwargs):
        raise AssertionError("a rank started")

    monkeypatch.setattr(spawn, "run_local_ranks", refuse)


TOY_ROW = {"prompt": "Q:1+2+3+4=", "answer": 10}  # the toy models read files with their tokenizer


def _bad_file(tmp_path, case):
    """(file, extra overrides, expected key, expected text) of one kind of bad data."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def parquet(name, rows, schema=None):
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / name)
        return tmp_path / name

    def jsonl(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return tmp_path / name

    if case == "missing file":
        return tmp_path / "nope.parquet", [], "SOURCE", "nope.parquet' is neither toy_math nor a file"
    if case == "wrong suffix":
        (tmp_path / "p.csv").write_text("prompt,answer\n")
        return tmp_path / "p.csv", [], "SOURCE", "p.csv: unknown format '.csv'; use a .jsonl"
    if case == "missing nested key":
        rows = [{"prompt": "Q:1+2+3+4=", "reward_model": {"ground_truth": "10"}},
                {"prompt": "Q:1+1+1+1=", "reward_model": {"ground_truth": None}}]
        return (parquet("p.parquet", rows), ["data.answer_key=reward_model.ground_truth"],
                "data.answer_key", "p.parquet row 1: no field 'reward_model.ground_truth' (the "
                "reference answer")
    if case == "non-string prompt":
        return (jsonl("p.jsonl", [TOY_ROW, {"prompt": 12, "answer": 3}]), [], "data.prompt_key",
                "p.jsonl:2: field 'prompt' is of type int, not a string or a list of chat messages")
    if case == "no user turn":
        rows = [{"prompt": [{"role": "system", "content": "Q:"}], "answer": 3}]
        return (parquet("p.parquet", rows), [], "data.prompt_key", "p.parquet row 0: field "
                "'prompt' is a list without a user turn")
    if case == "empty file":
        schema = pa.schema([("prompt", pa.string()), ("answer", pa.int64())])
        return parquet("p.parquet", [], schema), [], "SOURCE", "p.parquet' has no prompts"
    if case == "prompt too long":
        return (jsonl("p.jsonl", [TOY_ROW, {"prompt": "Q:" + "1+" * 20 + "1=", "answer": 21}]),
                [], "data.max_prompt_length", "p.jsonl:2: prompt has 44 tokens, more than 32")
    if case == "not parquet":
        (tmp_path / "p.parquet").write_text('{"prompt": "Q:1+2+3+4=", "answer": 10}\n')
        return tmp_path / "p.parquet", [], "SOURCE", "p.parquet does not read as Parquet: "
    if case == "not the toy alphabet":
        return (jsonl("p.jsonl", [{"prompt": "What is 1+2?", "answer": 3}]), [], "data.prompt_key",
                "p.jsonl:1: toy tokenizer: character 'W' is not in")
    if case == "chat template":
        return (jsonl("p.jsonl", [TOY_ROW]), ["data.chat_template=true"], "data.chat_template",
                "is true, but the toy task (data.source=toy_math) is written in the toy models'")
    raise AssertionError(case)


CASES = ("missing file", "wrong suffix", "missing nested key", "non-string prompt",
         "no user turn", "empty file", "prompt too long", "not parquet", "not the toy alphabet",
         "chat template")


@pytest.mark.parametrize("command,case", [("train", c) for c in CASES[::2]]
                         + [("eval", c) for c in CASES[1::2]] + [("eval", "missing file")])
def test_bad_data_is_one_line_before_any_model_loads(capsys, tmp_path, no_ranks_anywhere,
                                                     command, case):
    path, extra, key, text = _bad_file(tmp_path, case)
    source = "data.source" if command == "train" else "eval.source"
    where = [f"data.source={path}"] if command == "train" else [f"eval.source=[toy_math,{path}]"]
    line = one_line_error(capsys, [command, *where, *extra])
    assert line.startswith(f"{source if key == 'SOURCE' else key}: "), line
    assert text in line, line


def test_eval_sets_are_checked_by_train_too(capsys, tmp_path, no_ranks_anywhere):
    path, extra, key, text = _bad_file(tmp_path, "non-string prompt")
    line = one_line_error(capsys, ["train", f"eval.source=[{path}]"])
    assert line.startswith("data.prompt_key: ") and text in line


# ------------------------------------------------------------------------------------ item 10


def test_warmup_longer_than_the_run_warns_in_one_line(capsys):
    load_config(["trb.warmup_steps=150"])
    out = capsys.readouterr()
    warned = [line for line in out.err.splitlines() if "warning" in line]  # stderr, not stdout
    assert warned == ["trb-nemo: warning: trb.warmup_steps=150 > optim.max_steps=100: the TRB "
                      "warmup never finishes (eps_k never reaches 0, so the run never gets to "
                      "pure on-policy distillation); lower trb.warmup_steps or raise "
                      "optim.max_steps"]
    assert "warning" not in out.out
    assert main(["train", "--cfg", "job", "trb.warmup_steps=150"]) == 0  # a YAML comment there
    assert "# trb-nemo: warning: trb.warmup_steps=150" in capsys.readouterr().out
    for quiet in (["trb.warmup_steps=100"], ["trb.warmup_steps=150", "rollout.behavior=student"],
                  ["trb.warmup_steps=150", "trb.schedule=constant"]):
        load_config(quiet)
        assert "warning" not in capsys.readouterr().out, quiet


@pytest.fixture
def user_conf(tmp_path):
    """A user's own config folder: a copy of conf/ under another top-level name."""
    conf = tmp_path / "myconf"
    shutil.copytree(default_config_dir(), conf)
    (conf / "train.yaml").rename(conf / "mine.yaml")
    return conf


def _line_of(file: Path, text: str) -> int:
    return next(i for i, line in enumerate(file.read_text().splitlines(), 1) if text in line)


def test_type_error_in_a_user_yaml_names_key_value_file_and_line(capsys, user_conf):
    top = user_conf / "mine.yaml"
    top.write_text(top.read_text().replace("eps0: 0.02", "eps0: abc"))
    line = one_line_error(capsys, ["train", "--config-dir", str(user_conf), "--config-name",
                                   "mine"])
    assert line == (f"trb.eps0: Value 'abc' could not be converted to Float "
                    f"({top}:{_line_of(top, 'eps0: abc')})")
    group = user_conf / "model" / "tiny.yaml"
    group.write_text("student:\n  name: s\n  num_layers: two\n")
    line = one_line_error(capsys, ["train", "--config-dir", str(user_conf), "--config-name",
                                   "mine", "model=tiny", "trb.eps0=0.1"])
    assert line == ("model.student.num_layers: Value 'two' could not be converted to Integer "
                    f"({group}:3)")


def test_yaml_syntax_error_is_one_line_with_file_and_line(capsys, user_conf):
    top = user_conf / "mine.yaml"
    good = top.read_text()
    top.write_text(good.replace("warmup_steps: 50", "warmup_steps: [50"))
    line = one_line_error(capsys, ["train", "--config-dir", str(user_conf), "--config-name",
                                   "mine"])
    assert line.startswith(f"{top}:{_line_of(top, 'schedule: linear')}: YAML syntax error "), line
    assert "while parsing a flow sequence" in line
    top.write_text(good)
    group = user_conf / "parallel" / "tabs.yaml"
    group.write_text("tensor_model_parallel_size: 1\n\tbackend: gloo\n")
    line = one_line_error(capsys, ["train", "--config-dir", str(user_conf), "--config-name",
                                   "mine", "parallel=tabs"])
    assert line.startswith(f"{group}:2: YAML syntax error ") and "'\\t'" in line


# ------------------------------------------------------------------------------------ item 11


def _metrics(run_dir: Path, steps=60, warmup=50):
    rows = [{"step": 0, "eval/pass@1": 0.1}]
    for k in range(steps):
        rows.append({"step": k, "train/loss": 1.0 - k / 100, "rollout/reward": k / 100,
                     "rollout/eps": max(0.0, 0.02 * (1 - k / warmup)),
                     "rollout/beta_mean": 0.5 if k < warmup else 0.0,
                     "rollout/kl_mean": 0.01 if k < warmup else 0.0,
                     "rollout/teacher_token_share": 0.0, "rollout/temperature": 1.0,
                     "scoring/teacher_passes": 0})
    rows.append({"step": steps, "eval/pass@1": 0.4})
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_says_what_was_evaluated_and_what_trb_did(tmp_path):
    from trb_nemo.models.folders import CHECKPOINTS
    from trb_nemo.train.report import curves, write_report
    from trb_nemo.train.run_dir import RunFolder

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n"
                               for i in range(40)))
    cfg = load_config([f"data.source={prompts}", "optim.max_steps=60"])
    run = tmp_path / "run"
    _metrics(run)
    (run / "config_changes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"step": 30, "differences": ["optim.lr: 0.001 -> 0.0005", "eval.interval: 20 -> 10"]},
        {"step": 40, "checkpoint": "step_0000040", "changes": {"optim.max_steps": [40, 60]}})))
    summary = write_report(RunFolder(run, run / CHECKPOINTS), cfg)
    md = (run / "report.md").read_text()
    assert "4 held-out problems x 4 samples = 16 per evaluation" in md
    assert "64 problems" not in md and "fewer than eval.num_problems = 64" in md
    header = next(line for line in md.splitlines() if line.startswith("| during"))
    assert "mean beta" in header and "realized KL" in header
    assert "reverse-KL loss" in header and "rollout reward" in header
    assert "teacher-token share" not in md
    assert "| TRB warmup (steps 0-49) | 0.500 | 0.010 |" in md
    assert "## Config changes" in md
    assert "- step 30: optim.lr: 0.001 -> 0.0005; eval.interval: 20 -> 10" in md
    assert "- step 40: optim.max_steps: 40 -> 60" in md
    assert summary["pass@1_after"] == 0.4
    labels = [label for _, label in curves("trb")]
    assert labels == ["pass@1", "eps_k", "mean beta", "realized KL", "reverse-KL loss",
                      "rollout reward"]
    assert "teacher-token share (SKD injections)" in [label for _, label in curves("skd")]
    assert [k for k, _ in curves("student")] == ["eval/pass@1", "train/loss", "rollout/reward"]


def test_report_of_another_behavior_on_the_toy_task(tmp_path):
    from trb_nemo.models.folders import CHECKPOINTS
    from trb_nemo.train.report import write_report
    from trb_nemo.train.run_dir import RunFolder

    run = tmp_path / "run"
    _metrics(run, steps=10, warmup=1)
    write_report(RunFolder(run, run / CHECKPOINTS),
                 load_config(["rollout.behavior=skd", "optim.max_steps=10"]))
    md = (run / "report.md").read_text()
    assert "64 held-out problems x 4 samples" in md
    assert "teacher-token share (SKD injections)" in md and "mean beta" not in md
    assert "| training (steps 0-9) |" in md and "Config changes" not in md
