"""End-of-run report: ``report.md`` (pass@1 before/after, best, the schedule, what TRB did)
and ``report.png`` (pass@1 vs step with the warmup shaded, eps_k, mean beta, teacher-token
share, realized KL). Built from ``metrics.jsonl`` alone, on global rank 0."""

from __future__ import annotations

from pathlib import Path

from trb_nemo.config.schema import TrainConfig
from trb_nemo.train.metrics_log import read_jsonl


def _series(rows, key):
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_report(run_dir: Path, cfg: TrainConfig) -> dict:
    """Write report.md and report.png; returns the headline numbers."""
    rows = read_jsonl(run_dir / "metrics.jsonl")
    steps, passes = _series(rows, "eval/pass@1")
    warmup = cfg.trb.warmup_steps if cfg.rollout.behavior == "trb" else 0
    summary = {"pass@1_before": passes[0] if passes else None,
               "pass@1_after": passes[-1] if passes else None,
               "pass@1_best": max(passes) if passes else None,
               "best_step": steps[passes.index(max(passes))] if passes else None,
               "steps": max((r["step"] for r in rows), default=0)}
    plotted = _plot(run_dir / "report.png", rows, warmup)
    train_rows = [r for r in rows if "train/loss" in r]

    def mean(key, sel):
        vals = [r[key] for r in sel if key in r]
        return sum(vals) / len(vals) if vals else float("nan")

    in_warmup = [r for r in train_rows if r["step"] < warmup]
    after = [r for r in train_rows if r["step"] >= warmup]
    lines = [
        f"# trb-nemo run `{cfg.logging.run_name}`", "",
        f"Behavior `{cfg.rollout.behavior}`, eps0 = {cfg.trb.eps0}, schedule `{cfg.trb.schedule}`, "
        f"warmup K = {cfg.trb.warmup_steps} steps, loss `{cfg.loss.kind}`"
        f"{f' (k = {cfg.loss.topk})' if cfg.loss.kind == 'topk' else ''}, "
        f"TP = {cfg.parallel.tensor_model_parallel_size}, PP = {cfg.parallel.pipeline_model_parallel_size}.",
        "", f"| pass@1 (temperature {cfg.eval.temperature:.1f}, {cfg.eval.num_problems} problems "
        f"x {cfg.eval.num_samples} samples) | value |",
        "|---|---|",
        f"| before training (step 0) | {_fmt(summary['pass@1_before'])} |",
        f"| after training (step {steps[-1] if steps else '-'}) | {_fmt(summary['pass@1_after'])} |",
        f"| best (step {summary['best_step']}) | {_fmt(summary['pass@1_best'])} |", "",
        "| during | mean beta | realized KL | teacher-token share | reverse-KL loss | teacher scoring passes |",
        "|---|---|---|---|---|---|",
    ]
    for name, sel in (("TRB warmup", in_warmup), ("after warmup", after)):
        if sel:
            lines.append(f"| {name} (steps {sel[0]['step']}-{sel[-1]['step']}) | "
                         f"{_fmt(mean('rollout/beta_mean', sel))} | {_fmt(mean('rollout/kl_mean', sel))} | "
                         f"{_fmt(mean('rollout/teacher_token_share', sel))} | "
                         f"{_fmt(mean('train/loss', sel))} | "
                         f"{sum(r.get('scoring/teacher_passes', 0) for r in sel)} |")
    lines += ["", "![curves](report.png)" if plotted else
              "(no report.png: matplotlib is not installed)", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    return summary


def _fmt(x) -> str:
    return "-" if x is None or x != x else f"{x:.3f}"


def _plot(path: Path, rows, warmup: int) -> bool:
    """Draw the curves into ``path``; False (nothing drawn) where matplotlib is missing, as in
    a bare GPU image: the run's numbers are in report.md and metrics.jsonl anyway."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("eval/pass@1", "pass@1"), ("rollout/eps", "eps_k"), ("rollout/beta_mean", "mean beta"),
              ("rollout/teacher_token_share", "teacher-token share"), ("rollout/kl_mean", "realized KL")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.0 * len(panels)), sharex=True)
    for ax, (key, label) in zip(axes, panels, strict=True):
        xs, ys = _series(rows, key)
        ax.plot(xs, ys, marker="o" if key.startswith("eval") else None, markersize=3)
        if warmup > 0:
            ax.axvspan(0, warmup, color="tab:orange", alpha=0.15, lw=0)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("TRB warmup shaded" if warmup > 0 else "no warmup")
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
