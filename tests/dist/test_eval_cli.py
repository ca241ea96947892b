"""`trb-nemo eval` on the toy checkpoint, at TP=2 on 2 local gloo ranks (issue 15): three
evaluation sets (the toy task's held-out problems, the same problems as a JSONL file, and other
toy problems as verl-style Parquet: chat messages, ``reward_model.ground_truth``), each reported
on its own and as their mean.

The JSONL set holds exactly the problems training evaluates (``toy_math``, the held-out stream),
so its per-problem counts must equal that set's: the same prompts decoded with the same seed.
The checkpoint is given as a run folder whose newest ``step_*`` is step 3: the seed is training's
at step 3 and the JSON lands in the run folder.

Run: .venv/bin/python -m pytest tests/dist/test_eval_cli.py
"""

import json
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trb_nemo import seeds
from trb_nemo.config.compose import project_root
from trb_nemo.data import toy_math

pytestmark = pytest.mark.dist

PROBLEMS, SAMPLES, OTHER_SAMPLES = 4, 4, 2  # `other` takes eval.samples_per_set's count


def test_eval_on_several_sets_of_the_toy_checkpoint(tmp_path):
    held = [toy_math.problem(seeds.TOY_HELD_OUT, i) for i in range(PROBLEMS)]  # data.seed 0
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer})
                                                 + "\n" for p in held))
    other = [toy_math.problem(99, i) for i in range(PROBLEMS + 2)]
    pq.write_table(pa.Table.from_pylist([
        {"prompt": [{"role": "user", "content": p.prompt}],
         "reward_model": {"ground_truth": str(p.answer)}} for p in other]), tmp_path / "o.parquet")
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_0000003"
    shutil.copytree(project_root() / "examples/toy_math/checkpoints/student", step)
    meta = json.loads((step / "trb_nemo_model.json").read_text())
    (step / "trb_nemo_model.json").write_text(json.dumps({**meta, "step": 3}))

    done = subprocess.run(
        [sys.executable, "-m", "trb_nemo.cli", "eval", "--checkpoint", str(run),
         f"eval.source=[toy_math,{tmp_path / 'held.jsonl'},other:{tmp_path / 'o.parquet'}]",
         "eval.answer_key=answer|reward_model.ground_truth", f"eval.num_problems={PROBLEMS}",
         f"eval.num_samples={SAMPLES}", f"eval.samples_per_set={{other:{OTHER_SAMPLES}}}",
         "eval.max_new_tokens=32"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    result = json.loads((run / "eval_step_0000003.json").read_text())
    assert result["step"] == 3 and result["model"] == str(step)
    sets = {s["name"]: s for s in result["sets"]}
    assert list(sets) == ["toy_math", "held", "other"]
    assert [s["problems"] for s in sets.values()] == [PROBLEMS] * 3  # o.parquet capped at 4
    # the file of the held-out problems = the evaluation training runs on them
    assert sets["held"]["correct_per_problem"] == sets["toy_math"]["correct_per_problem"]
    m = result["metrics"]
    assert m["eval/correct_per_problem"] == [c for s in sets.values()
                                             for c in s["correct_per_problem"]]
    samples = {"toy_math": SAMPLES, "held": SAMPLES, "other": OTHER_SAMPLES}
    assert m["eval/problems_per_set"] == [PROBLEMS] * 3
    assert m["eval/samples_per_set"] == list(samples.values())
    assert m["eval/samples_per_problem"] == [n for n in samples.values() for _ in range(PROBLEMS)]
    for name, s in sets.items():
        assert s["samples"] == samples[name]
        assert all(0 <= c <= samples[name] for c in s["correct_per_problem"])
        assert s["pass@1"] == m[f"eval/{name}/pass@1"] == sum(s["correct_per_problem"]) / (
            PROBLEMS * samples[name])
    assert sum(m["eval/correct_per_problem"]) > 0  # the toy student solves some
    assert result["avg_pass@1"] == m["eval/pass@1"] == pytest.approx(
        sum(s["pass@1"] for s in sets.values()) / 3, abs=1e-15)
    table = done.stdout.splitlines()
    assert "TP=2" in done.stdout
    rows = {line.split()[0]: line.split()[1:] for line in table if line.split()
            and line.split()[0] in (*sets, "Avg")}
    assert rows["other"] == [str(PROBLEMS), str(OTHER_SAMPLES), f"{sets['other']['pass@1']:.4f}"]
    assert rows["Avg"] == [f"{result['avg_pass@1']:.4f}"]
