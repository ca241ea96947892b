"""`trb-nemo compare`: the paper's Table 1 on the toy task.

Runs every behavior (vanilla OPD ``student``, ``trb``, ``fixed``-eps blending, ``skd``
injection, ``temperature`` warmup) for each seed with the same overrides, one ``trb-nemo train``
run each (under ``<output_dir>/compare/<behavior>-seed<s>``; a finished run is not redone), then
writes ``<output_dir>/compare/table.md``: per method, pass@1 of the best checkpoint (the
evaluation with the highest pass@1, as the paper selects) and of the final one, mean and
standard deviation over seeds.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from trb_nemo.config.compose import load_config
from trb_nemo.methods import METHOD_NAMES, METHODS
from trb_nemo.train.metrics_log import read_jsonl


def run_compare(overrides: list[str], seeds: list[int], behaviors=METHOD_NAMES) -> Path:
    from trb_nemo.train.entry import run_train

    base = load_config(overrides)
    root = Path(base.logging.output_dir) / "compare"
    runs = {}
    for behavior in behaviors:
        for seed in seeds:
            name = f"compare/{behavior}-seed{seed}"
            cfg = load_config([*overrides, f"rollout.behavior={behavior}", f"seed={seed}",
                               f"rollout.seed={seed}", f"logging.run_name={name}"])
            run_dir = Path(cfg.logging.output_dir) / name
            if not (run_dir / "report.md").is_file():
                print(f"trb-nemo compare: {behavior}, seed {seed}", flush=True)
                run_train(cfg)
            runs[(behavior, seed)] = read_jsonl(run_dir / "metrics.jsonl")
    table = format_table(runs, behaviors, seeds, base)
    root.mkdir(parents=True, exist_ok=True)
    (root / "table.md").write_text(table)
    print(table)
    return root / "table.md"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}"


def format_table(runs: dict, behaviors, seeds, cfg) -> str:
    """Markdown table: pass@1 (%) at step 0, best checkpoint and final, mean ± std over seeds."""
    lines = [f"Toy task, pass@1 (%) at temperature {cfg.eval.temperature}, {cfg.eval.num_problems} "
             f"held-out problems x {cfg.eval.num_samples} samples, {cfg.optim.max_steps} steps, "
             f"eval every {cfg.eval.interval} steps; mean ± std over seeds {list(seeds)}.", "",
             "| Method | before | best checkpoint | final |", "|---|---|---|---|"]
    for behavior in behaviors:
        before, best, final = [], [], []
        for seed in seeds:
            evals = [r["eval/pass@1"] for r in runs[(behavior, seed)] if "eval/pass@1" in r]
            if evals:
                before.append(evals[0])
                best.append(max(evals))
                final.append(evals[-1])
        lines.append(f"| {METHODS[behavior].label} | {_mean_std(before)} | {_mean_std(best)} | "
                     f"{_mean_std(final)} |")
    return "\n".join(lines) + "\n"
