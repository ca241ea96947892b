"""`trb-nemo train`: validate, check the machine, start the ranks, run the trainer on each.

torch is imported only after the config is valid (a config error costs no torch import).

Under torchrun or srun this process is one rank. Otherwise it starts
``parallel.local_world_size`` local ranks itself (gloo on CPU) and waits for them.
"""

from __future__ import annotations

from trb_nemo.config.compose import composed_yaml
from trb_nemo.config.schema import ConfigError, TrainConfig
from trb_nemo.logs import global_rank, print0, quiet_third_party
from trb_nemo.parallel.env import launched_externally
from trb_nemo.parallel.spawn import run_local_ranks
from trb_nemo.train.run_dir import RunFolder


def rank_main(cfg: TrainConfig) -> dict:
    """The job on one rank."""
    quiet_third_party()  # before Megatron is imported
    from trb_nemo.train.trainer import Trainer

    return Trainer(cfg).fit()


def stage_config(cfg: TrainConfig, stage: str) -> TrainConfig:
    """The config of ``cfg``'s first stage, method ``stage`` (:mod:`trb_nemo.methods`): the
    SFT warmup's fine-tuning on teacher responses, ``sft.updates`` updates at ``sft.lr`` with
    ``sft.lr_warmup_steps`` of warmup, as the run ``<run_name>-sft`` next to the main one."""
    from dataclasses import replace

    if stage != "sft":
        raise ValueError(f"no first stage named {stage!r}")
    s = cfg.sft
    return replace(cfg, rollout=replace(cfg.rollout, behavior=stage, draft_tokens=0),
                   optim=replace(cfg.optim, lr=s.lr, lr_warmup_steps=s.lr_warmup_steps,
                                 max_steps=s.updates),
                   logging=replace(cfg.logging, run_name=f"{cfg.logging.run_name}-sft"),
                   checkpoint=replace(cfg.checkpoint, dir=None))


def run_pre_stage(cfg: TrainConfig, stage: str) -> tuple[TrainConfig | None, list[dict]]:
    """Run (or resume, or reuse when its report exists) ``cfg``'s first stage; returns ``cfg``
    with the student starting from that stage's final weights, or None (and the stage's
    results) when a signal stopped it."""
    from dataclasses import replace

    from trb_nemo.models.folders import latest_checkpoint
    first = stage_config(cfg, stage)
    run = RunFolder.of(first)
    results = []
    if not run.report.is_file():
        print0(f"trb-nemo: first stage `{stage}` ({first.optim.max_steps} updates): {run.path}")
        results = run_train(first)
        if results[0].get("stopped_by_signal"):
            return None, results
    weights = latest_checkpoint(run.checkpoints)
    if weights is None:
        raise ConfigError("checkpoint.dir", f"the first stage `{stage}` left no checkpoint in "
                                            f"{run.checkpoints}; delete {run.path} to redo it")
    print0(f"trb-nemo: the student starts from the first stage's weights, {weights}")
    student = replace(cfg.model.student, checkpoint=str(weights))
    return replace(cfg, model=replace(cfg.model, student=student)), results


def run_train(cfg: TrainConfig) -> list[dict]:
    """Run the job on every rank; returns the per-rank results (local ranks) or this rank's.
    A method with a first stage (:mod:`trb_nemo.methods`, e.g. the SFT warmup) runs it first.

    The process that starts the run (the launcher; global rank 0 under torchrun/srun) holds the
    run folder's lock until it ends: a second start on a live run is a ConfigError naming it,
    raised before the pre-flight reads or writes an existing folder and before any rank starts.
    A second Ctrl-C kills the local ranks at once: one line, exit code 130."""
    import sys

    from trb_nemo.commands.preflight import preflight
    from trb_nemo.methods.table import method_of
    from trb_nemo.parallel.spawn import Interrupted
    stage = method_of(cfg.rollout.behavior).pre_stage
    if stage is not None:
        cfg, stage_results = run_pre_stage(cfg, stage)
        if cfg is None:
            return stage_results
    run = RunFolder.of(cfg)
    new_folder = not run.path.exists()
    lock = run.lock() if global_rank() == 0 else None
    finished = False
    try:
        if lock is not None:
            lock.acquire(create=False)  # the folder exists: it may be a live run's
        cfg = preflight(cfg)  # imports torch: only after the config is valid
        if lock is not None:
            lock.acquire()  # a new folder (the pre-flight created it)
        # the trainer writes config.yaml once its checkpoint (if any) has loaded
        if launched_externally():
            results = [rank_main(cfg)]
        else:
            world = cfg.parallel.local_world_size
            print0(f"trb-nemo: starting {world} local rank(s), TP={cfg.parallel.tensor_model_parallel_size} "
                   f"PP={cfg.parallel.pipeline_model_parallel_size}, behavior={cfg.rollout.behavior}")
            results = run_local_ranks(rank_main, world, (cfg,), interrupt_note=(
                "trb-nemo: Ctrl-C: the ranks finish this step, save a checkpoint and exit; "
                "Ctrl-C again stops at once"))
        finished = True
    except KeyboardInterrupt as e:
        what = ("second Ctrl-C: stopped at once, every rank killed" if isinstance(e, Interrupted)
                else "interrupted")
        print(f"trb-nemo: {what}; rerun the same command to resume from the last checkpoint",
              file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    finally:
        if lock is not None:
            lock.release()
        if new_folder and not finished and global_rank() == 0:
            run.remove_if_unused()  # a refused or failed start leaves no empty run folder
    r = results[0]
    if r.get("stopped_by_signal"):
        print0(f"trb-nemo: stopped after step {r['step']} (signal {r['stopped_by_signal']}); "
               "checkpoint saved, rerun the same command to resume")
    elif r.get("pass@1_after") is not None:
            print0(f"trb-nemo: done, {r['step']} steps. pass@1 {r['pass@1_before']:.3f} before -> "
               f"{r['pass@1_after']:.3f} after (best {r['pass@1_best']:.3f} at step {r['best_step']}). "
               f"Report: {RunFolder.of(cfg).report}")
    return results


EXIT_STOPPED = 75
"""`trb-nemo train`'s exit code when a signal stopped the run after a checkpoint (rerun the same
command to resume; the Slurm job script requeues itself): not 0, so ``train ... && next`` does
not go on to the next command as if the run had finished (75: EX_TEMPFAIL, "try again")."""


def main(args) -> int:
    """`trb-nemo train [a.b=c ...] [--cfg job]`: compose the config and run it (or, with
    ``--cfg job``, print it with the architecture read from the model files where they are).
    Exit code 0 when the run finished, :data:`EXIT_STOPPED` when a signal stopped it."""
    from trb_nemo.config.compose import compose_config, print_notes, to_typed

    node = compose_config(args.overrides, config_name=args.config_name, config_dir=args.config_dir)
    cfg = to_typed(node)
    if args.cfg == "job":
        from trb_nemo.config.compose import take_notes
        from trb_nemo.models.resolve import resolve_models

        absent: list[str] = []
        text = composed_yaml(resolve_models(cfg, absent))
        print("".join(f"# trb-nemo: {line}\n" for line in take_notes() + absent) + text, end="")
        return 0
    print_notes()
    results = run_train(cfg)
    return EXIT_STOPPED if results and results[0].get("stopped_by_signal") else 0
