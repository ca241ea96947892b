"""`trb-nemo train`: validate, check the machine, start the ranks, run the job on each.

Under torchrun or srun this process is one rank. Otherwise it starts
``parallel.local_world_size`` local ranks itself (gloo on CPU) and waits for them.
"""

from __future__ import annotations

from trb_nemo.config.schema import TrainConfig
from trb_nemo.logs import print0, quiet_third_party
from trb_nemo.parallel.env import launched_externally
from trb_nemo.parallel.spawn import run_local_ranks
from trb_nemo.train.preflight import preflight


def rank_main(cfg: TrainConfig) -> dict:
    """The job on one rank."""
    quiet_third_party()  # before Megatron is imported
    from trb_nemo.train.smoke import smoke

    return smoke(cfg)


def run_train(cfg: TrainConfig) -> list[dict]:
    """Run the job on every rank; returns the per-rank results (local ranks) or this rank's."""
    cfg = preflight(cfg)
    if launched_externally():
        results = [rank_main(cfg)]
    else:
        world = cfg.parallel.local_world_size
        print0(f"trb-nemo: starting {world} local rank(s), TP={cfg.parallel.tensor_model_parallel_size} "
               f"PP={cfg.parallel.pipeline_model_parallel_size}")
        results = run_local_ranks(rank_main, world, (cfg,))
    r = results[0]
    print0(f"trb-nemo: stack check passed in {r['seconds']:.1f} s: student {r['student_params_local']:,} "
           f"and teacher {r['teacher_params_local']:,} parameters on rank 0; "
           f"student CE on the teacher's greedy tokens {r['loss']:.4f}; teacher grads: {r['teacher_has_grads']}")
    print0("trb-nemo: the TRB training loop is not implemented yet; this run checked the "
           "Megatron-Core stack on the configured layout")
    return results
