"""`trb-nemo eval`: pass@1 of a student on the evaluation sets, without training.

The config is composed like ``trb-nemo train``'s (conf/train.yaml and ``a.b=c`` overrides) and
the evaluation is the one training runs (:func:`trb_nemo.eval.pass_at_1.evaluate`, the
``eval.*`` settings, the sets of :func:`trb_nemo.data.prompts.build_eval_sets`), on the
student given by

* ``--checkpoint``: a Megatron checkpoint folder, a training checkpoint ``step_<N>``, or a run
  folder or its ``checkpoints/`` (the newest complete ``step_*``). Its architecture, stop id and
  context are the checkpoint's; prompts are tokenized with ``model.student.hf_path`` if set,
  else with the HF folder the checkpoint records (when it is on this machine). The sampling seed
  is the one training used at that step, so a training checkpoint's result is the evaluation
  its run logged at that step (the same ``eval.*``, seed and layout);
* else the config's student (``model.student.hf_path``, or the toy student checkpoint of the
  default config), evaluated with the seed of step 0.

The teacher is never loaded. Its stop id, merged into the student's as in training
(:class:`trb_nemo.models.vocab.SharedVocab`), comes from ``model.teacher`` when one is
configured; without one (``model.teacher=null``, or ``model=hf`` without
``model.teacher.hf_path``) the student's own stop id alone ends a response.

Bad input (config, model files, every evaluation prompt) stops with one line before a rank
starts. Ranks start as for ``trb-nemo train`` (local gloo/NCCL ranks, or this process is one
rank under torchrun/srun) in the ``parallel.*`` layout. Global rank 0 prints a table (set,
problems, samples per problem, pass@1, and the mean over sets, "Avg") and writes the result
as JSON (:func:`default_out`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from trb_nemo.config.schema import ConfigError, ModelSpec, TrainConfig
from trb_nemo.logs import global_rank


def saved_run_config(checkpoint: str) -> Path | None:
    """The config a checkpoint was trained with: the ``config.yaml`` saved in the checkpoint
    folder ``--checkpoint`` names (a run folder: its newest), else its run folder's; None for a
    checkpoint saved without one (``trb-nemo convert`` output)."""
    from trb_nemo.models.folders import CHECKPOINTS, newest_checkpoint
    from trb_nemo.train.run_dir import CONFIG_FILE

    folder = Path(newest_checkpoint(checkpoint))
    candidates = [folder / CONFIG_FILE]
    if folder.parent.name == CHECKPOINTS:
        candidates.append(folder.parent.parent / CONFIG_FILE)
    return next((c for c in candidates if c.is_file()), None)


def compose_eval_config(overrides, *, config_name: str = "train",
                        config_dir: str | None = None,
                        run_config: Path | None = None) -> tuple[TrainConfig, bool]:
    """(the validated config, whether it has no teacher). ``run_config``: a training run's saved
    ``config.yaml`` to compose from instead of ``conf/`` (its models, data and evaluation sets;
    ``overrides`` apply over it). Without a teacher (``model.teacher=null`` or a preset's
    teacher hf_path not given) the student stands in for it, so the config is valid and no other
    stop id is merged."""
    import tempfile

    if run_config is None:
        return _compose_eval(list(overrides), config_name, config_dir, check_own_models=True)
    with tempfile.TemporaryDirectory(prefix="trb-nemo-eval-") as staged:
        # composed like conf/train.yaml: from a folder that holds it
        (Path(staged) / "run.yaml").write_text(run_config.read_text())
        return _compose_eval(list(overrides), "run", staged, check_own_models=False)


def _compose_eval(overrides: list[str], config_name: str, config_dir: str | None, *,
                  check_own_models: bool) -> tuple[TrainConfig, bool]:
    from trb_nemo.config.compose import compose_config, print_notes, to_typed

    try:
        node = compose_config(overrides, config_name=config_name, config_dir=config_dir,
                              check_own_models=check_own_models)
    except ConfigError as e:
        if e.key != "model.teacher.hf_path" or not e.reason.startswith("is required"):
            raise
        node = compose_config([*overrides, "model.teacher=null"], config_name=config_name,
                              config_dir=config_dir, check_own_models=check_own_models)
    no_teacher = node.model.teacher is None
    if no_teacher:
        node.model.teacher = node.model.student  # a copy
    cfg = to_typed(node)
    print_notes()
    return cfg, no_teacher


def with_checkpoint(cfg: TrainConfig, checkpoint: str) -> tuple[TrainConfig, Path, int]:
    """(``cfg`` whose student is the checkpoint's network, its folder, its step) for
    ``--checkpoint`` (see the module docstring); ConfigError(--checkpoint) if it is none."""
    from trb_nemo.models.folders import newest_checkpoint, read_model_meta
    from trb_nemo.models.resolve import spec_from_meta

    folder = Path(newest_checkpoint(checkpoint))
    meta = read_model_meta(str(folder), "--checkpoint")
    recorded = meta.get("spec", {})
    hf_path = cfg.model.student.hf_path
    if hf_path is None and recorded.get("hf_path") and Path(recorded["hf_path"]).is_dir():
        hf_path = recorded["hf_path"]
    base = ModelSpec(name=recorded.get("name", cfg.model.student.name), hf_path=hf_path,
                     checkpoint=str(folder))
    student = spec_from_meta(meta, base)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, student=student))
    return cfg, folder, int(meta.get("step") or 0)


def default_out(cfg: TrainConfig, folder: Path | None, step: int) -> Path:
    """Where the JSON goes without ``--out``: ``<run>/eval_step_<N>.json`` for a step folder in a
    run's ``checkpoints/``, else ``eval_step_<N>.json`` (a checkpoint) or ``eval.json`` in the
    config's run folder (``logging.output_dir``/``logging.run_name``)."""
    from trb_nemo.models.folders import CHECKPOINTS
    from trb_nemo.train.run_dir import RunFolder

    name = "eval.json" if folder is None else f"eval_step_{step:07d}.json"
    if folder is not None and folder.parent.name == CHECKPOINTS:
        path = folder.parent.parent / name
    else:
        path = RunFolder.of(cfg).path / name
    n = 1  # an earlier result (training's, or another evaluation's) is never overwritten
    while path.exists():
        n += 1
        path = path.with_name(f"{name.removesuffix('.json')}-{n}.json")
    return path


def rank_main(cfg: TrainConfig, step: int) -> dict:
    """On one rank: build the student (weights only), evaluate, tear down. Returns the metrics."""
    from trb_nemo.logs import quiet_third_party

    quiet_third_party()  # before Megatron is imported
    from trb_nemo.data.prompts import build_eval_sets
    from trb_nemo.eval.pass_at_1 import evaluate
    from trb_nemo.models.networks import build_student
    from trb_nemo.models.vocab import SharedVocab
    from trb_nemo.parallel import groups

    pg = groups.initialize(cfg.parallel, cfg.seed)
    try:
        sets = build_eval_sets(cfg)
        student = build_student(cfg.model, cfg.parallel, pg)
        if step > 0:  # a training checkpoint: its delayed-scaling FP8 scales are calibrated
            from trb_nemo.models.gpt import mark_fp8_scales_ready

            mark_fp8_scales_ready(student)
        return evaluate(student, sets, cfg, SharedVocab.of(cfg.model), step, pg)
    finally:
        groups.destroy()


def run_eval(cfg: TrainConfig, *, no_teacher: bool = False, checkpoint: str | None = None,
             out: str | None = None) -> dict:
    """Check everything, evaluate on every rank, report on global rank 0; returns the result
    (:func:`result_record`). ConfigError for bad input, before any rank starts."""
    from trb_nemo.commands.preflight import check_machine, check_models
    from trb_nemo.data.prompts import build_eval_sets
    from trb_nemo.parallel.env import launched_externally
    from trb_nemo.parallel.spawn import run_local_ranks

    folder, step = None, 0
    if checkpoint is not None:
        cfg, folder, step = with_checkpoint(cfg, checkpoint)
    if no_teacher:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                 teacher=cfg.model.student))
    check_machine(cfg)
    cfg = check_models(cfg)
    sets = build_eval_sets(cfg)  # reads and checks every evaluation prompt
    path = Path(out) if out is not None else default_out(cfg, folder, step)
    _writable(path, "--out" if out is not None else "logging.output_dir")
    what = str(folder) if folder is not None else (cfg.model.student.hf_path
                                                    or cfg.model.student.checkpoint
                                                    or f"inline {cfg.model.student.name}")
    if launched_externally():
        metrics = rank_main(cfg, step)
    else:
        p = cfg.parallel
        if global_rank() == 0:
            print(f"trb-nemo: evaluating {what} (step {step}) on {len(sets)} set(s): starting "
                  f"{p.local_world_size} local rank(s), TP={p.tensor_model_parallel_size} "
                  f"PP={p.pipeline_model_parallel_size}", flush=True)
        try:
            metrics = run_local_ranks(rank_main, p.local_world_size, (cfg, step))[0]
        except KeyboardInterrupt:
            print("trb-nemo: interrupted", file=sys.stderr, flush=True)
            raise SystemExit(130) from None
    result = result_record(cfg, sets, metrics, what, step)
    if global_rank() == 0:
        print(format_table(result), flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"trb-nemo: wrote {path}", flush=True)
    return result


def _writable(path: Path, key: str) -> None:
    """The JSON can be written there: its folder is made and takes a file (checked before any
    rank starts, so an evaluation's result is never lost to a folder it cannot write)."""
    import os
    import tempfile

    blocker = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
    if path.is_dir() or (blocker is not None and not blocker.is_dir()):
        raise ConfigError(key, f"cannot write {str(path)!r}: "
                          f"{str(path if path.is_dir() else blocker)!r} is in the way")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".trb-nemo-write-test-", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(key, f"cannot write {str(path)!r}: {e.strerror or type(e).__name__}; "
                          "choose a file in a folder this job can write") from None


def result_record(cfg: TrainConfig, sets, metrics: dict, what: str, step: int) -> dict:
    """The JSON written: the model, the step (seed), the settings, one entry per set (its
    problems, correct samples per problem, pass@1) and ``avg_pass@1`` (= ``eval/pass@1``),
    plus the metrics as training logs them."""
    e = cfg.eval
    counts, entries, first = metrics["eval/correct_per_problem"], [], 0
    for s, size, n in zip(sets, metrics["eval/problems_per_set"], metrics["eval/samples_per_set"],
                          strict=True):
        correct = counts[first:first + size]
        first += size
        entries.append({"name": s.name, "source": s.source, "problems": size, "samples": n,
                        "pass@1": sum(correct) / max(size * n, 1),
                        "correct_per_problem": correct})
    return {"model": what, "step": step, "temperature": e.temperature,
            "max_new_tokens": e.max_new_tokens or cfg.rollout.max_new_tokens,
            "samples_per_problem": metrics["eval/samples_per_problem"], "sets": entries,
            "avg_pass@1": metrics["eval/pass@1"],
            "metrics": metrics}


def format_table(result: dict) -> str:
    """set | problems | samples | pass@1 rows, then ``Avg`` (the unweighted mean over sets)."""
    sets = result["sets"]
    width = max([len("set"), len("Avg"), *(len(s["name"]) for s in sets)])
    lines = [f"{'set':<{width}}  {'problems':>8}  {'samples':>7}  {'pass@1':>7}"]
    for s in sets:
        lines.append(f"{s['name']:<{width}}  {s['problems']:>8}  {s['samples']:>7}  "
                     f"{s['pass@1']:>7.4f}")
    lines.append(f"{'Avg':<{width}}  {'':>8}  {'':>7}  {result['avg_pass@1']:>7.4f}")
    return "\n".join(lines)


def main(args) -> int:
    """`trb-nemo eval [--checkpoint X] [--out F] [a.b=c ...]`. A checkpoint of a training run
    is evaluated with that run's config (its models, data and evaluation sets), unless
    ``--config-dir``/``--config-name`` name another."""
    run_config = None
    if args.checkpoint is not None and args.config_dir is None and args.config_name == "train":
        run_config = saved_run_config(args.checkpoint)
    cfg, no_teacher = compose_eval_config(args.overrides, config_name=args.config_name,
                                          config_dir=args.config_dir, run_config=run_config)
    run_eval(cfg, no_teacher=no_teacher, checkpoint=args.checkpoint, out=args.out)
    return 0
