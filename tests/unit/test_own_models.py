"""Your own HF models (issue 14, items 7 and 8): ``model.<role>.hf_path`` on the command line
trains that folder, not the preset's checkpoint; ``model=hf`` reads everything (architecture,
vocabulary, context, stop ids) from the folders; an explicit value still wins and a stop id is
checked against the resolved vocabulary; ``--cfg job`` prints the resolved networks. Export
keeps what the source config said and exports a run folder's newest checkpoint.

Tiny Qwen3 folders are made with ``transformers`` (config.json, generation_config.json whose
stop id differs from config.json's) and a word-level tokenizer built with ``tokenizers``; no
weights are needed before a rank starts.

Run: .venv/bin/python -m pytest tests/unit/test_own_models.py
"""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from cli_inputs import make_hf, one_line_error

from trb_nemo.cli import main
from trb_nemo.commands.convert import _write_hf_folder, plan
from trb_nemo.config.compose import load_config
from trb_nemo.config.schema import ModelSpec
from trb_nemo.models.hf_config import hf_config_from_spec, spec_from_hf_config
from trb_nemo.models.megatron_io import write_manifest

TOY_TASK = ["data.source=toy_math"]
"""Own models on the toy task: said explicitly (the default data.source is refused for them)."""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(student, teacher): the student stops on 7 by generation_config.json (config.json says
    5); the teacher's generation_config.json lists [150, 6]: 150 lies beyond the toy preset's
    128-token vocabulary but inside the teacher's own 160."""
    root = tmp_path_factory.mktemp("own")
    student = make_hf(root / "student", eos=5, generation_eos=7)
    teacher = make_hf(root / "teacher", hidden_size=64, layers=4, max_positions=512, eos=6,
                      generation_eos=[150, 6])
    return student, teacher


def cfg_job(capsys, *overrides) -> tuple[dict, list[str]]:
    """``trb-nemo train --cfg job``: (the printed YAML, its ``# trb-nemo:`` comment lines)."""
    assert main(["train", "--cfg", "job", *overrides, *TOY_TASK]) == 0
    out = capsys.readouterr().out
    return yaml.safe_load(out), [line for line in out.splitlines() if line.startswith("# ")]


# ------------------------------------------------------------------------------------- item 7


def test_hf_path_on_the_command_line_wins_over_the_toy_preset(capsys, models):
    """The README's own form on the default (toy) preset trains the given folders."""
    s, t = models
    job, notes = cfg_job(capsys, f"model.student.hf_path={s}", f"model.teacher.hf_path={t}")
    student, teacher = job["model"]["student"], job["model"]["teacher"]
    assert student["checkpoint"] is None and teacher["checkpoint"] is None
    assert (student["hidden_size"], student["num_layers"], student["vocab_size"]) == (48, 2, 160)
    assert (teacher["hidden_size"], teacher["num_layers"]) == (64, 4)
    assert student["eos_token_id"] == 7  # generation_config.json, not config.json's 5
    assert teacher["eos_token_id"] == 150  # the first of its list, beyond the toy's 128 ids
    assert (student["max_sequence_length"], teacher["max_sequence_length"]) == (384, 512)
    assert (student["name"], teacher["name"]) == ("student", "teacher")
    assert len(notes) == 2 and "model.student.hf_path=" in notes[0]
    assert "replaces the model preset's checkpoint=" in notes[0]
    assert "eos_token_id=1" in notes[0] and "max_sequence_length=128" in notes[0]


def test_the_same_overrides_reach_the_run(models):
    """What preflight hands the ranks (not only what --cfg job prints)."""
    from trb_nemo.commands.preflight import preflight

    s, t = models
    cfg = preflight(load_config([f"model.student.hf_path={s}", f"model.teacher.hf_path={t}",
                                 *TOY_TASK]))
    assert cfg.model.student.checkpoint is None and cfg.model.student.hf_path == s
    assert (cfg.model.student.eos_token_id, cfg.model.teacher.eos_token_id) == (7, 150)
    assert cfg.model.student.max_sequence_length == 384


def test_model_hf_preset_with_explicit_overrides(capsys, models):
    s, t = models
    job, notes = cfg_job(capsys, "model=hf", f"model.student.hf_path={s}",
                         f"model.teacher.hf_path={t}", "model.student.eos_token_id=3",
                         "model.teacher.max_sequence_length=256")
    student, teacher = job["model"]["student"], job["model"]["teacher"]
    assert notes == []  # nothing of the preset was dropped
    assert (student["eos_token_id"], teacher["eos_token_id"]) == (3, 150)
    assert (student["max_sequence_length"], teacher["max_sequence_length"]) == (384, 256)
    assert student["vocab_size"] == teacher["vocab_size"] == 160


def test_model_hf_needs_the_folders(capsys, no_ranks):
    line = one_line_error(capsys, ["train", "model=hf"])
    assert line.startswith("model.student.hf_path: ") and "model.student.hf_path=PATH" in line
    line = one_line_error(capsys, ["train", "--cfg", "job", "model=hf", "model.student.hf_path=x"])
    assert line.startswith("model.teacher.hf_path: ")


def test_explicit_stop_id_is_checked_against_the_resolved_vocabulary(capsys, models, no_ranks):
    s, t = models
    line = one_line_error(capsys, ["train", "model=hf", *TOY_TASK, f"model.student.hf_path={s}",
                                   f"model.teacher.hf_path={t}", "model.student.eos_token_id=200"])
    assert line.startswith("model.student.eos_token_id: must be in [0, vocab_size=160 of "), line
    assert "got 200" in line


def test_a_model_that_names_no_stop_id(capsys, tmp_path, models, no_ranks):
    s, _ = models
    bare = make_hf(tmp_path / "bare", eos=None, tokenizer=False)
    line = one_line_error(capsys, ["train", "model=hf", *TOY_TASK, f"model.student.hf_path={s}",
                                   f"model.teacher.hf_path={bare}"])
    assert line.startswith("model.teacher.eos_token_id: not set, and "), line


def test_cfg_job_shows_the_resolved_toy_checkpoints(capsys):
    job, _ = cfg_job(capsys)
    assert job["model"]["student"]["hidden_size"] == 64
    assert job["model"]["teacher"]["num_layers"] == 4


def test_cfg_job_without_the_files_here(capsys):
    """A cluster preset checked on a machine without its folders: shown as configured."""
    job, notes = cfg_job(capsys, "model=qwen3_8b_to_1.7b")
    assert job["model"]["student"]["hf_path"] == "checkpoints/Qwen3-1.7B-Base"
    assert any("is not on this machine" in n for n in notes)


def test_cfg_job_fails_on_files_that_do_not_resolve(capsys, tmp_path, models):
    s, _ = models
    bad = tmp_path / "mistral"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"]}))
    line = one_line_error(capsys, ["train", "--cfg", "job", *TOY_TASK, f"model.student.hf_path={s}",
                                   f"model.teacher.hf_path={bad}"])
    assert line.startswith("model.teacher.hf_path: architecture 'MistralForCausalLM'")


# ------------------------------------------------------------------------------------- item 8


def _source_spec(folder: str, cap: int) -> ModelSpec:
    """The spec a run trained: the folder's architecture, context capped at ``cap``."""
    hf = json.loads((Path(folder) / "config.json").read_text())
    return spec_from_hf_config(hf, ModelSpec(hf_path=folder, max_sequence_length=cap,
                                             eos_token_id=7), "k")


def test_export_config_keeps_the_source_keys(models):
    s, _ = models
    source = json.loads((Path(s) / "config.json").read_text())
    spec = _source_spec(s, 128)
    assert spec.max_sequence_length == 128
    config = hf_config_from_spec(spec, source)
    assert config["max_position_embeddings"] == 384  # the source's, not the training cap
    assert config["pad_token_id"] == 4 and config["eos_token_id"] == 5
    assert config["hidden_size"] == 48 and config["architectures"] == ["Qwen3ForCausalLM"]
    assert hf_config_from_spec(spec)["max_position_embeddings"] == 128  # without a source


def _run_folder(root: Path, spec: ModelSpec) -> Path:
    """A run folder whose checkpoints/ holds complete steps 2 and 10 and an incomplete 11."""
    meta = {"format": 1, "spec": dataclasses.asdict(spec), "hf_config": None, "step": 0}
    for step in (2, 10, 11):
        folder = root / "checkpoints" / f"step_{step:07d}"
        folder.mkdir(parents=True)
        if step != 11:
            (folder / ".metadata").write_bytes(b"index")  # placeholder tensor index
            (folder / "trb_nemo_model.json").write_text(json.dumps(meta))
            write_manifest(folder)  # intact: the export verifies what it reads
    return root


def test_export_of_a_run_folder_takes_its_newest_checkpoint(tmp_path, models):
    s, _ = models
    run = _run_folder(tmp_path / "run", _source_spec(s, 128))
    for given in (run, run / "checkpoints"):
        job = plan("megatron-to-hf", str(given), str(tmp_path / "out"))
        assert job.source == str(run / "checkpoints" / "step_0000010")
    assert job.hf_config["max_position_embeddings"] == 384  # read from the source folder
    out = tmp_path / "out"
    out.mkdir()
    _write_hf_folder(job, out)  # rank 0's part, without weight shards
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == 384 and config["pad_token_id"] == 4
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 7
    assert (out / "tokenizer.json").is_file()


def test_export_without_the_source_folder_writes_the_stop_id(tmp_path, models):
    s, _ = models
    spec = dataclasses.replace(_source_spec(s, 128), hf_path=None, eos_token_id=9)
    job = plan("megatron-to-hf", str(_run_folder(tmp_path / "run", spec)), str(tmp_path / "o"))
    out = tmp_path / "o"
    out.mkdir()
    _write_hf_folder(job, out)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 9


def test_convert_cli_says_which_checkpoint_it_exports(capsys, tmp_path, models, monkeypatch):
    import trb_nemo.parallel.spawn as spawn

    s, _ = models
    run = _run_folder(tmp_path / "run", _source_spec(s, 128))
    started = []
    monkeypatch.setattr(spawn, "run_local_ranks", lambda fn, n, args: started.append(args[0]))
    assert main(["convert", "megatron-to-hf", "--checkpoint", str(run),
                 "--out", str(tmp_path / "o")]) == 0
    assert started[0].source.endswith("step_0000010")
    out = capsys.readouterr().out
    assert "exporting its newest intact one" in out and "step_0000010" in out
    (tmp_path / "empty").mkdir()
    line = one_line_error(capsys, ["convert", "megatron-to-hf", "--checkpoint",
                                   str(tmp_path / "empty"), "--out", str(tmp_path / "o2")])
    assert line.startswith("--checkpoint: ") and "no complete step_* checkpoint" in line
