"""`trb-nemo plan`: the per-GPU peak memory of each phase of a config, from the models' shapes
only (nothing loads); exit 2 with one line when a phase is over ``parallel.gpu_memory_gb``."""

from __future__ import annotations


def main(args) -> int:
    from trb_nemo.config.compose import load_config, print_notes
    from trb_nemo.models.resolve import resolve_models
    from trb_nemo.plan.memory import (
        check_fits,
        format_plan,
        layout_of,
        plan_memory,
        planned_world_size,
    )

    cfg = load_config(args.overrides)
    absent: list[str] = []  # checkpoints not here yet: planned from the inline shapes
    cfg = resolve_models(cfg, absent)
    print_notes()
    world = args.world_size or planned_world_size(cfg)
    phases = plan_memory(cfg, world)
    print(format_plan(phases, cfg.parallel.gpu_memory_gb, layout_of(cfg, world)), flush=True)
    check_fits(phases, cfg.parallel.gpu_memory_gb)
    return 0
