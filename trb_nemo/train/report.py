"""End-of-run report: ``report.md`` (pass@1 before/after, best, on what it was evaluated, what
the behavior did, config changes on resume) and ``report.png`` (pass@1 vs step with the warmup
shaded, the behavior's own curves, the loss and the rollout reward). Built from
``metrics.jsonl`` (and ``config_changes.jsonl`` when a resume changed the config), on global
rank 0.

What each method does is shown by its own metrics (``Method.curves`` in
:mod:`trb_nemo.methods`): TRB and fixed-eps blending by eps, mean beta and the realized KL; SKD
by its teacher-token (injection) share; the temperature warmup by the sampling temperature;
Veto by its b; vanilla OPD by the loss and reward alone.
"""

from __future__ import annotations

import json
from pathlib import Path

from trb_nemo.config.schema import TrainConfig
from trb_nemo.data.prompts import eval_entries, evaluated_problems
from trb_nemo.methods.table import method_of
from trb_nemo.train.metrics_log import read_jsonl
from trb_nemo.train.run_dir import RunFolder

COMMON_CURVES = (("rollout/reward", "rollout reward"),)


SPECULATIVE_CURVES = (("rollout/draft_acceptance", "draft acceptance (speculative TRB)"),
                      ("rollout/teacher_forwards_per_token", "teacher forwards per token"))
"""Shown when rollout.draft_tokens > 0."""


def loss_label(behavior: str, veto_direction: str = "forward") -> str:
    """What ``train/loss`` is for ``behavior``'s target (:mod:`trb_nemo.methods.table`)."""
    target = method_of(behavior).target
    if target == "veto":
        return f"Veto's {veto_direction}-KL loss"
    if target == "sft":
        return "cross-entropy loss (SFT on teacher samples)"
    return "reverse-KL loss"


def curves(behavior: str, speculative: bool = False,
           veto_direction: str = "forward") -> tuple[tuple[str, str], ...]:
    """The (metric, label) pairs of the report for ``behavior``, pass@1 first."""
    return (("eval/pass@1", "pass@1"), *method_of(behavior).curves,
            *(SPECULATIVE_CURVES if speculative else ()),
            ("train/loss", loss_label(behavior, veto_direction)), *COMMON_CURVES)


def _warmup(cfg: TrainConfig) -> tuple[int, str]:
    """(steps, name) of the method's warmup phase; (0, "") when it has none."""
    return method_of(cfg.rollout.behavior).warmup(cfg)


def _behavior_line(cfg: TrainConfig) -> str:
    return method_of(cfg.rollout.behavior).describe(cfg)


def _loss_line(cfg: TrainConfig) -> str:
    target = method_of(cfg.rollout.behavior).target
    if target == "veto":
        return (f"loss: Veto's {cfg.loss.veto_direction} KL to its target Q over the full "
                "vocabulary")
    if target == "sft":
        return "loss: the cross-entropy of the teacher's sampled tokens"
    topk = f" (k = {cfg.loss.topk})" if cfg.loss.kind == "topk" else ""
    return f"loss `{cfg.loss.kind}`{topk}"


def _evaluated(cfg: TrainConfig) -> tuple[str, list[str]]:
    """(the pass@1 header's description of the evaluation set, notes under the table)."""
    e, n = cfg.eval, evaluated_problems(cfg)
    if e.source is not None:  # sets given on their own: pass@1 is their mean
        names = ", ".join(name for name, _ in eval_entries(cfg))
        per_set = "".join(f", {k}: {v}" for k, v in e.samples_per_set.items())
        return (f"{'?' if n is None else n} problems of {names} x {e.num_samples} samples"
                f"{per_set}, mean over the sets"), []
    if n is None:
        return f"at most {e.num_problems} held-out problems x {e.num_samples} samples", []
    what = f"{n} held-out problems x {e.num_samples} samples = {n * e.num_samples} per evaluation"
    if n < e.num_problems:
        return what, [f"pass@1 is over the {n} problems `{cfg.data.source}` holds out (its first "
                      f"tenth), fewer than eval.num_problems = {e.num_problems}.", ""]
    return what, []


def config_changes(run: RunFolder) -> list[str]:
    """``step N: a: x -> y; b: ...`` per line of ``config_changes.jsonl`` (unreadable lines
    skipped); [] without the file."""
    path = run.config_changes
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            diffs = row.get("differences") or [f"{k}: {old} -> {new}" for k, (old, new)
                                               in row.get("changes", {}).items()]
            out.append(f"step {row['step']}: {'; '.join(map(str, diffs))}")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            continue
    return out


def _series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_report(run: RunFolder, cfg: TrainConfig) -> dict:
    """Write report.md and report.png; returns the headline numbers."""
    rows = read_jsonl(run.metrics)
    steps, passes = _series(rows, "eval/pass@1")
    warmup, phase = _warmup(cfg)
    summary = {"pass@1_before": passes[0] if passes else None,
               "pass@1_after": passes[-1] if passes else None,
               "pass@1_best": max(passes) if passes else None,
               "best_step": steps[passes.index(max(passes))] if passes else None,
               "steps": max((r["step"] for r in rows), default=0)}
    shown = curves(cfg.rollout.behavior, cfg.rollout.draft_tokens > 0, cfg.loss.veto_direction)
    plotted = _plot(run.report.with_suffix(".png"), rows, warmup, shown, phase)
    train_rows = [r for r in rows if "train/loss" in r]

    def mean(key, sel):
        vals = [r[key] for r in sel if key in r]
        return sum(vals) / len(vals) if vals else float("nan")

    evaluated, notes = _evaluated(cfg)
    columns = [c for c in shown if c[0] != "eval/pass@1" and c[0] != "rollout/eps"]
    lines = [
        f"# trb-nemo run `{cfg.logging.run_name}`", "",
        f"{_behavior_line(cfg)}; {_loss_line(cfg)}, "
        f"TP = {cfg.parallel.tensor_model_parallel_size}, PP = {cfg.parallel.pipeline_model_parallel_size}.",
        "", f"| pass@1 (temperature {cfg.eval.temperature:.1f}, {evaluated}) | value |",
        "|---|---|",
        f"| before training (step 0) | {_fmt(summary['pass@1_before'])} |",
        f"| after training (step {steps[-1] if steps else '-'}) | {_fmt(summary['pass@1_after'])} |",
        f"| best (step {summary['best_step']}) | {_fmt(summary['pass@1_best'])} |", "", *notes,
        "| during | " + " | ".join(label for _, label in columns) + " | teacher scoring passes |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    phases = ((phase, [r for r in train_rows if r["step"] < warmup]),
              ("after warmup" if warmup else "training",
               [r for r in train_rows if r["step"] >= warmup]))
    for name, sel in phases:
        if sel:
            lines.append(f"| {name} (steps {sel[0]['step']}-{sel[-1]['step']}) | "
                         + " | ".join(_fmt(mean(key, sel)) for key, _ in columns)
                         + f" | {sum(r.get('scoring/teacher_passes', 0) for r in sel)} |")
    changes = config_changes(run)
    if changes:
        lines += ["", "## Config changes", "", "Resumed with a changed config:", "",
                  *(f"- {c}" for c in changes)]
    lines += ["", "![curves](report.png)" if plotted else
              "(no report.png: matplotlib is not installed)", ""]
    run.report.write_text("\n".join(lines))
    return summary


def _fmt(x) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"


def _plot(path: Path, rows, warmup: int, panels, phase: str = "TRB warmup") -> bool:
    """Draw ``panels`` ((metric, label) pairs) into ``path``; False (nothing drawn) where
    matplotlib is missing, as in a bare GPU image: the run's numbers are in report.md and
    metrics.jsonl anyway."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.0 * len(panels)), sharex=True)
    for ax, (key, label) in zip(axes, panels, strict=True):
        xs, ys = _series(rows, key)
        ax.plot(xs, ys, marker="o" if key.startswith("eval") else None, markersize=3)
        if warmup > 0:
            ax.axvspan(0, warmup, color="tab:orange", alpha=0.15, lw=0)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{phase} shaded" if warmup > 0 else "no warmup")
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
