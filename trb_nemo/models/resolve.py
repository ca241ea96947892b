"""Pre-flight: turn each ModelSpec that points at files into a full architecture, and check it.

A spec with ``checkpoint`` takes its architecture from the checkpoint's metadata file; one with
only ``hf_path`` from the HF ``config.json``; an inline spec is used as written. Then the layout
(TP/PP divisibility, context length, top-k) and the shared vocabulary are checked. Every failure
is a one-line :class:`ConfigError` naming the key to change. No torch import: this runs before
any rank starts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from trb_nemo.config.schema import ConfigError, ModelSpec, TrainConfig, check_same_vocab
from trb_nemo.models.hf_config import read_config_json, spec_from_hf_config, tokenizer_vocab

MODEL_META = "trb_nemo_model.json"
"""Written into every Megatron checkpoint folder we save: the network's ModelSpec fields and,
when it came from HF, the source config.json (so export restores the same HF config)."""


def read_model_meta(folder: str, key: str) -> dict:
    """The metadata of a complete trb-nemo Megatron checkpoint folder, or ConfigError(key)."""
    path = Path(folder)
    if not path.exists():
        raise ConfigError(key, f"{folder!r} does not exist")
    meta = path / MODEL_META
    if not meta.is_file():
        hint = ""
        steps = sorted(p.name for p in path.glob("step_*") if (p / MODEL_META).is_file())
        if steps:
            hint = f" (it holds training checkpoints: use {folder}/{steps[-1]})"
        raise ConfigError(key, f"{folder!r} is not a complete trb-nemo checkpoint: no {MODEL_META}"
                          f"{hint}; make one with `trb-nemo convert hf-to-megatron`")
    return json.loads(meta.read_text())


def spec_from_meta(meta: dict, base: ModelSpec) -> ModelSpec:
    """``base`` with the architecture recorded in a checkpoint (name, paths and eos kept)."""
    keep = {"name", "hf_path", "checkpoint", "eos_token_id", "max_sequence_length"}
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    arch = {k: v for k, v in meta["spec"].items() if k in fields and k not in keep}
    return dataclasses.replace(base, **arch)


def resolve_spec(spec: ModelSpec, key: str) -> ModelSpec:
    """The full architecture of one network (see the module docstring)."""
    hf = read_config_json(spec.hf_path, f"{key}.hf_path") if spec.hf_path is not None else None
    if spec.checkpoint is not None:
        return spec_from_meta(read_model_meta(spec.checkpoint, f"{key}.checkpoint"), spec)
    if hf is not None:
        return spec_from_hf_config(hf, spec, f"{key}.hf_path")
    return spec


def resolve_models(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with resolved student and teacher specs, checked against the run's layout."""
    student = resolve_spec(cfg.model.student, "model.student")
    teacher = cfg.model.teacher and resolve_spec(cfg.model.teacher, "model.teacher")
    for role, spec in (("student", student), ("teacher", teacher)):
        if spec is not None:
            cfg.check_model_fits(role, spec)
    if teacher is not None:
        check_same_vocab(student, teacher)
        check_same_tokenizer(student, teacher)
    model = dataclasses.replace(cfg.model, student=student, teacher=teacher)
    return dataclasses.replace(cfg, model=model)


def check_same_tokenizer(student: ModelSpec, teacher: ModelSpec) -> None:
    """Both HF folders' tokenizer.json map every token to the same id (when both have one)."""
    if student.hf_path is None or teacher.hf_path is None:
        return
    vs, vt = tokenizer_vocab(student.hf_path), tokenizer_vocab(teacher.hf_path)
    if vs is None or vt is None or vs == vt:
        return
    differ = sorted(t for t in set(vs) | set(vt) if vs.get(t) != vt.get(t))
    raise ConfigError("model.teacher.hf_path", f"the teacher's tokenizer differs from the "
                      f"student's on {len(differ)} tokens (e.g. {differ[0]!r}); distill between "
                      "models that share one tokenizer")
