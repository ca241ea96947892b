"""What a new user still hit, item by item, through the CLI: every refusal is one line before any
model loads or rank starts, a refused or failed start changes nothing on disk, no remedy is
offered that does not work, run names do not collide, own models never meet the toy task or the
toy teacher unless the user says so.

Run: .venv/bin/python -m pytest tests/unit/test_new_user.py
"""

import json
import os
import re
from pathlib import Path

import pytest
from cli_inputs import make_hf, one_line_error
from conftest import CHECKOUT, outputs_state

from trb_nemo.cli import main
from trb_nemo.commands.train import EXIT_STOPPED
from trb_nemo.config.compose import composed_yaml, load_config
from trb_nemo.config.schema import MAX_DRAFT_TOKENS
from trb_nemo.models.folders import MODEL_META
from trb_nemo.models.megatron_io import write_manifest
from trb_nemo.train.run_dir import CONFIG_CHANGES, RESUME_ENV, portable_yaml


@pytest.fixture(autouse=True)
def _own_resume_choice(monkeypatch):
    monkeypatch.setenv(RESUME_ENV, "")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(student, teacher): tiny HF Qwen3 folders with tokenizers and (placeholder) weights."""
    root = tmp_path_factory.mktemp("own")
    return (make_hf(root / "student", vocab_size=128, eos=5),
            make_hf(root / "teacher", vocab_size=128, hidden_size=64, eos=6))


def fake_checkpoint(folder: Path, step: int, config_yaml: str) -> Path:
    """An intact-looking training checkpoint (manifest over placeholder files) with its config."""
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"index")
    (folder / "__0_0.distcp").write_bytes(os.urandom(64))
    (folder / MODEL_META).write_text(json.dumps({"format": 1, "step": step, "world_size": 1}))
    (folder / "config.yaml").write_text(portable_yaml(config_yaml))
    write_manifest(folder, world_size=1)
    return folder


def listing(folder: Path) -> list[tuple[str, int, int]]:
    """Every file with its size and modification time (folders: their names); the lock file
    aside (a run folder that ran has one; each start takes it)."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() else 0,
                   p.stat().st_mtime_ns if p.is_file() else 0)
                  for p in folder.rglob("*") if p.name != ".lock")


# ---------------------------------------------------- 1. no test depends on the checkout's state


def test_each_test_runs_in_an_empty_folder_of_its_own():
    here = Path.cwd()
    assert here != CHECKOUT and CHECKOUT not in here.parents
    assert list(here.iterdir()) == []


def test_the_outputs_guard_sees_any_change(tmp_path):
    assert outputs_state(tmp_path) is None
    (tmp_path / "outputs" / "run").mkdir(parents=True)
    before = outputs_state(tmp_path)
    (tmp_path / "outputs" / "run" / "metrics.jsonl").write_text("{}\n")
    after = outputs_state(tmp_path)
    assert before != after
    (tmp_path / "outputs" / "run" / "metrics.jsonl").write_text("{}\n{}\n")
    assert outputs_state(tmp_path) != after


# --------------------------------------------------------------- 2. run names and another network


def test_default_run_names_differ_across_models_and_methods(capsys, models):
    s, t = models
    names = []
    for overrides in ([], ["rollout.behavior=veto"],
                      ["model=hf", f"model.student.hf_path={s}", f"model.teacher.hf_path={t}",
                       "data.source=toy_math"]):
        assert main(["train", "--cfg", "job", *overrides]) == 0
        names.append(re.search(r"run_name: (\S+)", capsys.readouterr().out).group(1))
    assert names == ["trb-toy-student-from-toy-teacher", "veto-toy-student-from-toy-teacher",
                     "trb-student-from-teacher"]
    line = one_line_error(capsys, ["train", "logging.run_name=../elsewhere"])
    assert line.startswith("logging.run_name: must name a folder inside logging.output_dir")


def test_another_network_is_refused_without_a_remedy_that_crashes(capsys, tmp_path, no_ranks):
    run = [f"logging.output_dir={tmp_path}", "logging.run_name=r"]
    fake_checkpoint(tmp_path / "r" / "checkpoints" / "step_0000003", 3,
                    composed_yaml(load_config(run)))
    (tmp_path / "r" / "config.yaml").write_text(composed_yaml(load_config(run)))
    before = listing(tmp_path / "r")
    line = one_line_error(capsys, ["train", *run, "model.student.num_layers=4",
                                   "model.student.checkpoint=null",
                                   "checkpoint.allow_config_change=true"])
    assert line.startswith("logging.run_name: ") and "another network" in line, line
    assert "allow_config_change" not in line and "${project_root:}" not in line, line
    assert listing(tmp_path / "r") == before  # config.yaml kept, no change recorded
    assert not (tmp_path / "r" / CONFIG_CHANGES).exists()


# ------------------------------------------------------------ 3. own models, the toy task and eval


def test_own_models_never_meet_the_toy_task_or_teacher_silently(capsys, models, no_ranks):
    s, t = models
    for command in ("train", "eval"):
        line = one_line_error(capsys, [command, "model=hf", f"model.student.hf_path={s}",
                                       f"model.teacher.hf_path={t}"])
        assert line.startswith("data.source: is the toy task") and "data.source=FILE" in line
    line = one_line_error(capsys, ["train", f"model.student.hf_path={s}", "data.source=toy_math"])
    assert line.startswith("model.teacher.hf_path: ") and "toy demo's teacher" in line
    line = one_line_error(capsys, ["train", "data.chat_template=true"])
    assert line.startswith("data.chat_template: ") and "toy task" in line


def test_eval_of_a_run_takes_its_config_and_keeps_earlier_results(capsys, tmp_path, models,
                                                                  monkeypatch):
    """``trb-nemo eval --checkpoint RUN`` of a ``model=hf`` run: the run's models and data, not
    the toy preset's (whose teacher's vocabulary differs); a second evaluation does not
    overwrite the first one's file."""
    import trb_nemo.parallel.spawn as spawn
    from trb_nemo.commands.eval import default_out

    s, t = models
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"what is {w}", "answer": "1"}) + "\n"
                               for w in ("one", "two", "three") * 4))
    cfg = load_config(["model=hf", f"model.student.hf_path={s}", f"model.teacher.hf_path={t}",
                       f"data.source={prompts}", f"logging.output_dir={tmp_path}",
                       "logging.run_name=hf-run"])
    run = tmp_path / "hf-run"
    step = fake_checkpoint(run / "checkpoints" / "step_0000002", 2, composed_yaml(cfg))
    meta = json.loads((step / MODEL_META).read_text())
    meta["spec"] = {**cfg.model.student.__dict__, "num_layers": 2, "hidden_size": 48,
                    "ffn_hidden_size": 96, "num_attention_heads": 4, "num_query_groups": 2,
                    "kv_channels": 16, "vocab_size": 128, "eos_token_id": 5,
                    "max_sequence_length": 384}
    (step / MODEL_META).write_text(json.dumps(meta))
    write_manifest(step, world_size=1)
    seen = []
    monkeypatch.setattr(spawn, "run_local_ranks", lambda fn, n, args: seen.append(args[0]) or [
        {"eval/correct_per_problem": [0], "eval/problems_per_set": [1],
         "eval/samples_per_set": [1], "eval/samples_per_problem": 1, "eval/pass@1": 0.0}])
    assert main(["eval", "--checkpoint", str(run)]) == 0
    evaluated = seen[0]
    assert evaluated.model.teacher.hf_path == t and evaluated.data.source == str(prompts)
    assert evaluated.model.student.checkpoint == str(step)
    first = run / "eval_step_0000002.json"
    assert first.is_file() and default_out(evaluated, step, 2) == run / "eval_step_0000002-2.json"


# --------------------------------------------------------------------- 4. plans that cannot run


def test_a_layout_the_recipes_shapes_cannot_take_is_refused(capsys):
    for argv in (["plan", "recipe=paper_qwen3_1.7b", "parallel.tensor_model_parallel_size=3",
                  "--world-size", "6"],
                 ["launch", "slurm", "--dry-run", "recipe=paper_qwen3_1.7b",
                  "parallel.tensor_model_parallel_size=3", "launcher.gpus_per_node=6"]):
        line = one_line_error(capsys, argv)
        assert line.startswith("parallel.tensor_model_parallel_size: TP=3 must divide"), line
    assert not Path("outputs").exists()  # the refused dry run wrote no script


# ----------------------------------------------------------------------- 5. late tracebacks


def test_a_folder_without_weights_is_one_line_before_any_rank(capsys, tmp_path, models,
                                                             no_ranks):
    s, t = models
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bare / name).write_bytes((Path(s) / name).read_bytes())
    line = one_line_error(capsys, ["train", "model=hf", f"model.student.hf_path={bare}",
                                   f"model.teacher.hf_path={t}", "data.source=toy_math"])
    assert line.startswith("model.student.hf_path: ") and "no *.safetensors" in line
    line = one_line_error(capsys, ["eval", "model=hf", f"model.student.hf_path={bare}",
                                   "data.source=toy_math"])
    assert line.startswith("model.student.hf_path: ") and "no *.safetensors" in line
    line = one_line_error(capsys, ["convert", "hf-to-megatron", "--hf-path", str(bare),
                                   "--out", str(tmp_path / "o")])
    assert line.startswith("--hf-path: ") and "no *.safetensors" in line


def test_export_skips_a_damaged_newest_checkpoint_and_refuses_a_damaged_one(capsys, tmp_path,
                                                                            monkeypatch):
    import trb_nemo.parallel.spawn as spawn
    from trb_nemo.commands.convert import intact_checkpoint

    run = tmp_path / "run"
    text = composed_yaml(load_config([]))
    old = fake_checkpoint(run / "checkpoints" / "step_0000002", 2, text)
    new = fake_checkpoint(run / "checkpoints" / "step_0000004", 4, text)
    data = new / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[:10])  # cut: the manifest's size no longer holds
    assert intact_checkpoint(str(run)) == str(old)
    assert "skipping step_0000004, damaged" in capsys.readouterr().err
    line = one_line_error(capsys, ["convert", "megatron-to-hf", "--checkpoint", str(new),
                                   "--out", str(tmp_path / "o")])
    assert line.startswith("--checkpoint: ") and "is damaged" in line
    (old / "__0_0.distcp").unlink()
    monkeypatch.setattr(spawn, "run_local_ranks", lambda *a: pytest.fail("a rank started"))
    line = one_line_error(capsys, ["convert", "megatron-to-hf", "--checkpoint", str(run),
                                   "--out", str(tmp_path / "o")])
    assert "every checkpoint" in line and "is damaged" in line


def test_eval_out_that_cannot_be_written_is_refused_before_the_evaluation(capsys, tmp_path,
                                                                         monkeypatch):
    import trb_nemo.parallel.spawn as spawn

    monkeypatch.setattr(spawn, "run_local_ranks", lambda *a: pytest.fail("a rank started"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    line = one_line_error(capsys, ["eval", "--out", str(a_file / "r.json")])
    assert line.startswith("--out: cannot write") and "is in the way" in line
    if os.geteuid() != 0:  # root writes anywhere: the in-the-way case above covers the check
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        line = one_line_error(capsys, ["eval", "--out", str(ro / "r.json")])
        assert line.startswith("--out: cannot write")


# ------------------------------------------------------------- 6. settings that mean nothing


def test_settings_veto_ignores_and_the_internal_stage_are_refused(capsys):
    for key in ("loss.kind=full", "loss.topk=8"):
        line = one_line_error(capsys, ["train", "rollout.behavior=veto", key])
        assert line.startswith(key.split("=")[0] + ": has no effect with rollout.behavior=veto")
    line = one_line_error(capsys, ["train", "rollout.behavior=sft"])
    assert line.startswith("rollout.behavior: 'sft' is a stage") and "sft_warmup" in line
    line = one_line_error(capsys, ["train", "rollout.behavior=nope"])
    assert "sft|" not in line and "|sft," not in line  # the internal stage is not offered


def test_the_report_names_each_targets_loss():
    from trb_nemo.train.report import _loss_line, curves

    assert ("train/loss", "Veto's forward-KL loss") in curves("veto")
    assert ("train/loss", "Veto's reverse-KL loss") in curves("veto", veto_direction="reverse")
    assert ("train/loss", "reverse-KL loss") in curves("trb")
    sft_warmup_stage = load_config(["rollout.behavior=sft_warmup"])
    from dataclasses import replace
    stage = replace(sft_warmup_stage, rollout=replace(sft_warmup_stage.rollout, behavior="sft"))
    assert "topk" not in _loss_line(stage) and "cross-entropy" in _loss_line(stage)
    assert "forward KL" in _loss_line(load_config(["rollout.behavior=veto"]))


# ------------------------------------------------------------------------------ 7. smaller


def test_a_data_file_edited_in_place_is_a_changed_setting(capsys, tmp_path, models, no_ranks):
    from trb_nemo.commands.preflight import preflight

    prompts = tmp_path / "p.jsonl"
    rows = [{"prompt": "Q:1+2+3+4=", "answer": "10"}] * 30
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = [f"logging.output_dir={tmp_path}", "logging.run_name=r", f"data.source={prompts}"]
    cfg = preflight(load_config(run))
    assert cfg.data.fingerprint.startswith("sha256:")
    fake_checkpoint(tmp_path / "r" / "checkpoints" / "step_0000003", 3, composed_yaml(cfg))
    assert preflight(load_config(run)).data.fingerprint == cfg.data.fingerprint  # resumes
    rows[5] = {"prompt": "Q:9+9+9+9=", "answer": "36"}  # same path and size, other bytes
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = one_line_error(capsys, ["train", *run])
    assert line.startswith("checkpoint.allow_config_change: ")
    assert "data.fingerprint" in line and "a data file's contents changed" in line


def test_a_stopped_run_exits_with_its_own_code(monkeypatch):
    import trb_nemo.commands.train as train

    monkeypatch.setattr(train, "run_train", lambda cfg: [{"stopped_by_signal": 15, "step": 3}])
    assert main(["train"]) == EXIT_STOPPED != 0
    monkeypatch.setattr(train, "run_train", lambda cfg: [{"stopped_by_signal": 0, "step": 100}])
    assert main(["train"]) == 0


def test_a_failed_start_leaves_no_run_folder(tmp_path, monkeypatch):
    import trb_nemo.commands.train as train

    def fail(*args, **kwargs):
        raise RuntimeError("rank 0 failed")

    monkeypatch.setattr(train, "run_local_ranks", fail)
    with pytest.raises(RuntimeError):
        main(["train", f"logging.output_dir={tmp_path}/out"])
    assert list((tmp_path / "out").iterdir()) == []  # no run folder, no .lock, no checkpoints/


def test_the_readme_states_the_draft_range_the_schema_checks():
    text = (CHECKOUT / "README.md").read_text()
    m = re.search(r"`rollout\.draft_tokens=g` \(an integer from 0 to (\d+);", text)
    assert m is not None and int(m.group(1)) == MAX_DRAFT_TOKENS
