"""`trb-nemo eval` before any rank starts: the config without a teacher, the student a
``--checkpoint`` names, where the JSON goes, the table; the report names the evaluation sets.

Run: .venv/bin/python -m pytest tests/unit/test_eval_command.py
"""

import json
import shutil
from pathlib import Path

import pytest

from trb_nemo.commands.eval import compose_eval_config, default_out, format_table, with_checkpoint
from trb_nemo.config.compose import load_config, project_root
from trb_nemo.config.schema import ConfigError

TOY_STUDENT = project_root() / "examples/toy_math/checkpoints/student"


def test_no_teacher_needed(tmp_path):
    cfg, no_teacher = compose_eval_config([])
    assert not no_teacher and cfg.model.teacher.eos_token_id == 2  # its stop id is merged
    cfg, no_teacher = compose_eval_config(["model.teacher=null"])
    assert no_teacher and cfg.model.teacher == cfg.model.student
    # model=hf requires both folders for training; evaluation goes on without the teacher's
    cfg, no_teacher = compose_eval_config(["model=hf", f"model.student.hf_path={tmp_path}",
                                           "data.source=toy_math"])
    assert no_teacher and cfg.model.student.hf_path == str(tmp_path)
    with pytest.raises(ConfigError, match="model.student.hf_path: is required"):
        compose_eval_config(["model=hf"])


def test_checkpoint_of_a_run_folder(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    run = tmp_path / "run"
    for step in (3, 12):
        folder = run / "checkpoints" / f"step_{step:07d}"
        shutil.copytree(TOY_STUDENT, folder)
        meta = json.loads((folder / "trb_nemo_model.json").read_text())
        meta["spec"].update(name="trained", hf_path=str(hf), eos_token_id=5)
        (folder / "trb_nemo_model.json").write_text(json.dumps({**meta, "step": step}))
    (run / "checkpoints" / "step_0000020.tmp").mkdir()  # an unfinished save is not taken
    cfg = load_config([])
    for given in (run, run / "checkpoints", run / "checkpoints" / "step_0000012"):
        evaluated, folder, step = with_checkpoint(cfg, str(given))
        assert (folder, step) == (run / "checkpoints" / "step_0000012", 12)
        s = evaluated.model.student
        assert (s.checkpoint, s.name, s.eos_token_id, s.hf_path) == (str(folder), "trained", 5,
                                                                     str(hf))
        assert default_out(evaluated, folder, step) == run / "eval_step_0000012.json"
    shutil.rmtree(hf)  # the recorded tokenizer folder is gone: none, unless the config names one
    assert with_checkpoint(cfg, str(run))[0].model.student.hf_path is None
    assert default_out(cfg, None, 0) == Path("outputs/trb-toy-student-from-toy-teacher/eval.json")
    with pytest.raises(ConfigError, match="--checkpoint: .* holds no complete step_"):
        with_checkpoint(cfg, str(tmp_path))


def test_table_and_report_name_the_sets(tmp_path):
    result = {"avg_pass@1": 0.375, "sets": [
        {"name": "math500", "problems": 500, "samples": 4, "pass@1": 0.5},
        {"name": "aime24", "problems": 30, "samples": 4, "pass@1": 0.25}]}
    assert format_table(result).splitlines() == [
        "set      problems  samples   pass@1",
        "math500       500        4   0.5000",
        "aime24         30        4   0.2500",
        "Avg                          0.3750"]
    from trb_nemo.train.report import _evaluated

    (tmp_path / "a.jsonl").write_text('{"prompt": "Q:1+2+3+4=", "answer": 10}\n' * 3)
    cfg = load_config([f"eval.source=[toy_math,math:{tmp_path / 'a.jsonl'}]", "eval.num_problems=5"])
    assert _evaluated(cfg) == ("8 problems of toy_math, math x 4 samples, mean over the sets", [])


def test_samples_per_set_must_name_a_set(tmp_path):
    from trb_nemo.data.prompts import build_eval_sets

    base = ["eval.source=[toy_math]"]
    sets = build_eval_sets(load_config([*base, "eval.samples_per_set={toy_math:3}"]))
    assert [s.name for s in sets] == ["toy_math"]
    assert load_config([*base, "eval.samples_per_set={toy_math:3}"]).eval.samples_of("toy_math") == 3
    with pytest.raises(ConfigError, match="eval.samples_per_set: aime24: no evaluation set"):
        build_eval_sets(load_config([*base, "eval.samples_per_set={aime24:512}"]))
    with pytest.raises(ConfigError, match="eval.samples_per_set: names sets of eval.source"):
        build_eval_sets(load_config(["eval.samples_per_set={toy_math:3}"]))


def test_compare_rates_average_over_sets_not_problems():
    """Two sets of 2 and 4 problems with their own sample counts: the plain mean of the
    per-problem rates compare resamples is the mean over sets (``eval/pass@1``)."""
    from trb_nemo.commands.compare import _rates

    row = {"eval/correct_per_problem": [2, 0, 1, 1, 1, 1], "eval/problems_per_set": [2, 4],
           "eval/samples_per_problem": [2, 2, 4, 4, 4, 4]}
    set_rates = [(2 + 0) / (2 * 2), (1 + 1 + 1 + 1) / (4 * 4)]
    assert _rates(row).mean().item() == pytest.approx(sum(set_rates) / 2, abs=1e-15)
    single = {"eval/correct_per_problem": [1, 3], "eval/samples_per_problem": 4}
    assert _rates(single).tolist() == [0.25, 0.75]
