"""Where a run writes (no torch import: the launcher and the CLI use it too).

``<logging.output_dir>/<logging.run_name>/``: metrics.jsonl, tensorboard/, report.md/.png,
config.yaml, checkpoints/ (unless checkpoint.dir is set), slurm/ (scripts and job logs).
"""

from __future__ import annotations

from pathlib import Path

from trb_nemo.config.schema import TrainConfig

STOP_MARKER = "STOPPED_BY_SIGNAL"
"""Written into the run folder when a signal stopped the run after a checkpoint; the Slurm job
script requeues itself when it finds it."""


def run_dir_of(cfg: TrainConfig) -> Path:
    return Path(cfg.logging.output_dir) / cfg.logging.run_name
