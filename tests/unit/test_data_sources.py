"""Issue 15, real data: prompt files in JSONL and Parquet with configurable (nested) keys and
chat messages, the chat template, toy problems in a file for the toy models, and evaluation
sets given on their own (eval.source), each capped by eval.num_problems.

Run: .venv/bin/python -m pytest tests/unit/test_data_sources.py
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_inputs import write_word_tokenizer

from trb_nemo import seeds
from trb_nemo.config.compose import load_config
from trb_nemo.config.schema import ConfigError
from trb_nemo.data import toy_math
from trb_nemo.data.answers import math_answer_matches
from trb_nemo.data.prompts import ToyMathSource, build_eval_sets, build_source, evaluated_problems

WORDS = "system user assistant please reason step by what is one two three plus".split()
ID = {w: i + 1 for i, w in enumerate(WORDS)}  # write_word_tokenizer: [UNK] = 0, then the words
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}assistant{% endif %}")


def ids(text: str) -> tuple[int, ...]:
    return tuple(ID[w] for w in text.split())


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A tokenizer folder (word level, with a chat template) `transformers` loads."""
    folder = tmp_path_factory.mktemp("tok")
    write_word_tokenizer(folder, WORDS)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return str(folder)


def write(path, rows):
    """``rows`` as JSONL or Parquet, by the suffix."""
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cfg_of(hf, *overrides):
    return load_config([f"model.student.hf_path={hf}", f"model.teacher.hf_path={hf}",
                        "parallel=cpu_tp1", *overrides])


VERL = [{"data_source": "x", "prompt": [{"role": "system", "content": "two two"},
                                        {"role": "user", "content": "what is one plus two"}],
         "reward_model": {"style": "rule", "ground_truth": "3"}},
        {"data_source": "x", "prompt": [{"role": "user", "content": "what is two plus two"}],
         "reward_model": {"style": "rule", "ground_truth": "4"}}]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_verl_rows_chat_messages_and_nested_answer(tmp_path, hf, suffix):
    path = write(tmp_path / f"train{suffix}", VERL)
    source = build_source(cfg_of(hf, f"data.source={path}",
                                 "data.answer_key=reward_model.ground_truth"))
    # the first user turn's text; the dataset's own system message is not used
    assert [(p.ids, p.answer) for p in source.items] == [(ids("what is one plus two"), "3"),
                                                        (ids("what is two plus two"), "4")]


def test_openthoughts_conversations_and_key_alternatives(tmp_path, hf):
    solution = r"two plus two is four, so \boxed{4}"
    path = write(tmp_path / "ot3.parquet", [
        {"difficulty": 3, "conversations": [{"from": "human", "value": "what is two plus two"},
                                            {"from": "gpt", "value": solution}]}])
    source = build_source(cfg_of(hf, f"data.source={path}", "data.prompt_key=conversations",
                                 "data.answer_key=conversations.1.value"))
    assert source.items[0].ids == ids("what is two plus two")
    assert source.items[0].answer == solution
    assert math_answer_matches(r"I get \boxed{4}", source.items[0].answer)
    mixed = write(tmp_path / "mixed.jsonl", [{"problem": "what is one plus two", "answer": 3},
                                             {"question": "what is two plus one", "answer": "3"}])
    source = build_source(cfg_of(hf, f"data.source={mixed}", "data.prompt_key=problem|question"))
    assert [p.ids for p in source.items] == [ids("what is one plus two"),
                                             ids("what is two plus one")]


def test_system_prompt_with_and_without_the_chat_template(tmp_path, hf):
    path = write(tmp_path / "p.jsonl", [{"prompt": "what is one plus two", "answer": "3"}] * 3)
    plain = build_source(cfg_of(hf, f"data.source={path}",
                                "data.system_prompt='please reason step by step '"))
    assert plain.items[0].ids == ids("please reason step by step what is one plus two")
    chat = build_source(cfg_of(hf, f"data.source={path}", "data.chat_template=true",
                               "data.system_prompt='please reason step by step'"))
    assert chat.items[0].ids == ids("system please reason step by step user what is one plus two "
                                    "assistant")
    no_system = build_source(cfg_of(hf, f"data.source={path}", "data.chat_template=true"))
    assert no_system.items[0].ids == ids("user what is one plus two assistant")


def test_toy_problems_in_a_file_use_the_toy_tokenizer_and_checker(tmp_path):
    stream = seeds.TOY_HELD_OUT  # data.seed 0: the toy task's held-out problems
    problems = [toy_math.problem(stream, i) for i in range(5)]
    path = write(tmp_path / "toy.parquet", [{"q": p.prompt, "a": p.answer} for p in problems])
    source = build_source(load_config([f"data.source={path}", "data.prompt_key=q",
                                       "data.answer_key=a"]))
    toy = ToyMathSource(0, 32)
    assert source.items == toy.eval_prompts(5)
    tok = toy_math.CharTokenizer()
    p = problems[0]
    assert source.check(tok.encode(p.solution) + [toy_math.STUDENT_STOP], str(p.answer))
    assert not source.check(tok.encode(p.solution.replace(f"A{p.answer}", "A0")), str(p.answer))


def test_eval_sets_named_capped_and_separate_from_training(tmp_path, hf):
    a = write(tmp_path / "a.jsonl", [{"prompt": f"what is {w} plus one", "answer": "x"}
                                      for w in ("one", "two", "three")])
    (tmp_path / "b").mkdir()
    b = write(tmp_path / "b" / "test.parquet", [{"prompt": "what is one plus one", "answer": "2"}] * 5)
    train = write(tmp_path / "train.jsonl", [{"prompt": "what is one", "answer": "1"}] * 40)
    cfg = cfg_of(hf, f"data.source={train}", f"eval.source=[{a},math:{b}]", "eval.num_problems=4")
    source = build_source(cfg)
    assert source.n_eval == 0 and len(source.items) == 40  # every training prompt trains
    sets = source.eval_sets
    assert [(s.name, s.source, len(s.prompts)) for s in sets] == [("a", str(a), 3),
                                                                 ("math", str(b), 4)]
    assert sets[0].prompts[2].ids == ids("what is three plus one")
    assert evaluated_problems(cfg) == 7
    everything = cfg_of(hf, f"data.source={train}", f"eval.source=[{a},math:{b}]",
                        "eval.num_problems=0")
    assert [len(s.prompts) for s in build_eval_sets(everything)] == [3, 5]
    assert evaluated_problems(everything) == 8
    held = cfg_of(hf, f"data.source={train}", "eval.num_problems=3")  # eval.source null
    source = build_source(held)
    assert source.n_eval == 3 and [len(s.prompts) for s in source.eval_sets] == [3]
    toy = build_eval_sets(load_config(["eval.source=[toy_math]", "eval.num_problems=2"]))
    assert toy[0].prompts == ToyMathSource(0, 32).eval_prompts(2)
    with pytest.raises(ConfigError, match="two sets named 'a'"):
        build_eval_sets(cfg_of(hf, f"data.source={train}", f"eval.source=[{a},a:{b}]"))
    with pytest.raises(ConfigError, match="eval.num_problems: 0 .all problems. needs"):
        load_config(["eval.source=[toy_math]", "eval.num_problems=0"])


def test_chat_template_the_tokenizer_lacks(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    write_word_tokenizer(plain, WORDS)
    path = write(tmp_path / "p.jsonl", [{"prompt": "what is one plus two", "answer": "3"}])
    with pytest.raises(ConfigError) as e:
        build_source(cfg_of(plain, f"data.source={path}", "data.chat_template=true"))
    assert e.value.key == "data.chat_template" and "has no chat template" in e.value.reason


def test_prompts_without_answers_and_skipping_long_prompts(tmp_path, hf):
    path = write(tmp_path / "ot.parquet", [
        {"conversations": [{"from": "human", "value": "what is one plus two"}]},
        {"conversations": [{"from": "human", "value": "one two " * 40}]},  # 80 tokens
        {"conversations": [{"from": "human", "value": "what is two plus two"}]}])
    evals = write(tmp_path / "ev.jsonl", [{"prompt": "what is two plus one", "answer": "3"}])
    common = (f"data.source={path}", "data.prompt_key=conversations", "data.answer_key=null",
              "data.max_prompt_length=16")
    with pytest.raises(ConfigError, match=r"data.max_prompt_length: .*ot.parquet row 1: prompt "
                                          r"has 80 tokens"):
        build_source(cfg_of(hf, *common, f"eval.source=[{evals}]", "eval.answer_key=answer", "eval.prompt_key=prompt"))
    source = build_source(cfg_of(hf, *common, f"eval.source=[{evals}]", "eval.answer_key=answer", "eval.prompt_key=prompt",
                                 "data.skip_long_prompts=true"))
    assert [(p.ids, p.answer) for p in source.items] == [(ids("what is one plus two"), None),
                                                        (ids("what is two plus two"), None)]
    assert source.skipped == [f"{path} row 1"]
    assert [p.answer for p in source.eval_sets[0].prompts] == ["3"]  # eval keeps its answers
    with pytest.raises(ConfigError, match="data.answer_key: is null .* eval.source"):
        build_source(cfg_of(hf, *common, "data.skip_long_prompts=true"))
    with pytest.raises(ConfigError, match="eval.answer_key: evaluation sets need reference"):
        build_source(cfg_of(hf, *common, f"eval.source=[{evals}]", "eval.prompt_key=prompt",
                                "data.skip_long_prompts=true"))
