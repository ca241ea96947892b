"""Pre-flight: turn each ModelSpec that points at files into a full architecture, and check it.

A spec with ``checkpoint`` takes its architecture from the checkpoint's metadata file; one with
only ``hf_path`` from the HF ``config.json``; an inline spec is used as written. A stop id or
context left None comes from the same files: ``eos_token_id`` from generation_config.json, else
config.json (or what the checkpoint recorded), ``max_sequence_length`` from
``max_position_embeddings``; an explicit stop id is then checked against the resolved
vocabulary. Then the layout (TP/PP divisibility, context length, top-k) and the shared
vocabulary are checked. Every failure is a one-line :class:`ConfigError` naming the key to
change. No torch import: this runs before any rank starts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from trb_nemo.config.schema import ConfigError, ModelSpec, TrainConfig, check_eos, check_same_vocab
from trb_nemo.models.folders import read_model_meta
from trb_nemo.models.hf_config import (
    model_eos_token_id,
    read_config_json,
    spec_from_hf_config,
    tokenizer_vocab,
)


def spec_from_meta(meta: dict, base: ModelSpec) -> ModelSpec:
    """``base`` with the architecture recorded in a checkpoint (name and paths kept; the stop
    id and context kept where base sets them, else the recorded ones)."""
    keep = {"name", "hf_path", "checkpoint"}
    keep |= {k for k in ("eos_token_id", "max_sequence_length") if getattr(base, k) is not None}
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    arch = {k: v for k, v in meta["spec"].items() if k in fields and k not in keep}
    return dataclasses.replace(base, **arch)


def resolve_spec(spec: ModelSpec, key: str) -> ModelSpec:
    """The full architecture of one network, stop id and context included (see the module
    docstring)."""
    hf = read_config_json(spec.hf_path, f"{key}.hf_path") if spec.hf_path is not None else None
    if spec.checkpoint is not None:
        spec = spec_from_meta(read_model_meta(spec.checkpoint, f"{key}.checkpoint"), spec)
        where = spec.checkpoint
    elif hf is not None:
        where = spec.hf_path
        if spec.eos_token_id is None:
            spec = dataclasses.replace(spec, eos_token_id=model_eos_token_id(spec.hf_path, hf)[0])
        spec = spec_from_hf_config(hf, spec, f"{key}.hf_path")
    else:
        return spec  # inline: checked at construction
    if spec.eos_token_id is None:
        raise ConfigError(f"{key}.eos_token_id", f"not set, and {where!r} names no eos_token_id "
                          "(generation_config.json, config.json); set it to the model's stop id")
    check_eos(spec.eos_token_id, spec.vocab_size, f"{key}.eos_token_id", f" of {where}")
    return spec


def resolve_models(cfg: TrainConfig, absent: list[str] | None = None) -> TrainConfig:
    """``cfg`` with resolved student and teacher specs, checked against the run's layout.

    With an ``absent`` list (``trb-nemo train --cfg job``, ``plan``, ``launch slurm``): a network
    whose folder is not on this machine is kept as configured and a line saying so appended to
    ``absent``; when its preset carries the shapes inline (``max_sequence_length`` set, as the
    recipes' do: the planner sizes the run with them), the layout is checked against them, else
    the checks that need the folder are skipped. Files that are here must resolve."""
    specs = {"student": cfg.model.student, "teacher": cfg.model.teacher}
    resolved = {}
    for role, spec in specs.items():
        if spec is None:
            resolved[role] = None
            continue
        missing = [f"{name}={path}" for name, path in (("hf_path", spec.hf_path),
                                                       ("checkpoint", spec.checkpoint))
                   if path is not None and not Path(path).exists()]
        if absent is not None and missing:
            absent.append(f"model.{role}: {', '.join(missing)} is not on this machine; shown as "
                          "configured, not resolved")
            if spec.max_sequence_length is not None:  # inline shapes: the ones the plan uses
                cfg.check_model_fits(role, spec)
            continue
        resolved[role] = resolve_spec(spec, f"model.{role}")
        cfg.check_model_fits(role, resolved[role])
    student, teacher = resolved.get("student"), resolved.get("teacher")
    if student is not None and teacher is not None:
        check_same_vocab(student, teacher)
        check_same_tokenizer(student, teacher)
    model = dataclasses.replace(cfg.model, **{role: resolved.get(role, specs[role])
                                              for role in specs})
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
