"""`trb-nemo train`: validate, check the machine, start the ranks, run the trainer on each.

Under torchrun or srun this process is one rank. Otherwise it starts
``parallel.local_world_size`` local ranks itself (gloo on CPU) and waits for them.
"""

from __future__ import annotations

from trb_nemo.config.compose import composed_yaml
from trb_nemo.config.schema import TrainConfig
from trb_nemo.logs import global_rank, print0, quiet_third_party
from trb_nemo.parallel.env import launched_externally
from trb_nemo.parallel.spawn import run_local_ranks
from trb_nemo.train.preflight import preflight


def rank_main(cfg: TrainConfig) -> dict:
    """The job on one rank."""
    quiet_third_party()  # before Megatron is imported
    from trb_nemo.train.trainer import Trainer

    return Trainer(cfg).fit()


def save_composed_config(cfg: TrainConfig) -> None:
    """``<run_dir>/config.yaml``: the resolved config this run uses (rank 0)."""
    from trb_nemo.train.run_dir import run_dir_of

    if global_rank() != 0:
        return
    run_dir = run_dir_of(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(composed_yaml(cfg))


def run_train(cfg: TrainConfig) -> list[dict]:
    """Run the job on every rank; returns the per-rank results (local ranks) or this rank's."""
    cfg = preflight(cfg)
    save_composed_config(cfg)
    if launched_externally():
        results = [rank_main(cfg)]
    else:
        world = cfg.parallel.local_world_size
        print0(f"trb-nemo: starting {world} local rank(s), TP={cfg.parallel.tensor_model_parallel_size} "
               f"PP={cfg.parallel.pipeline_model_parallel_size}, behavior={cfg.rollout.behavior}")
        results = run_local_ranks(rank_main, world, (cfg,))
    r = results[0]
    if r.get("stopped_by_signal"):
        print0(f"trb-nemo: stopped after step {r['step']} (signal {r['stopped_by_signal']}); "
               "checkpoint saved, rerun the same command to resume")
    elif r.get("pass@1_after") is not None:
        from trb_nemo.train.run_dir import run_dir_of

        print0(f"trb-nemo: done, {r['step']} steps. pass@1 {r['pass@1_before']:.3f} before -> "
               f"{r['pass@1_after']:.3f} after (best {r['pass@1_best']:.3f} at step {r['best_step']}). "
               f"Report: {run_dir_of(cfg) / 'report.md'}")
    return results
