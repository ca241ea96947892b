"""`trb-nemo compare`: the paper's Table 1 on a task (the toy by default).

Runs each chosen method (:mod:`trb_nemo.methods`) at its configured point, or over the paper's
sweep (``--sweep``), for each seed with the same overrides: one ``trb-nemo train`` run each
under ``<output_dir>/compare/<method>[-p<point>]-seed<s>``. A finished run (its report written)
is not redone and an unfinished one resumes from its last checkpoint, so a killed comparison
continues where it stopped.

Then ``<output_dir>/compare/table.md`` and ``pass_at_1.png``. Per method, at the paper's
selection rule (the evaluation with the highest pass@1, evaluations every ``eval.interval``
steps; over a sweep, the point whose mean best-checkpoint pass@1 is highest) and at the final
checkpoint: the mean pass@1 over seeds x held-out problems with its standard error, and the
difference to vanilla OPD (``student``) with a 95% paired bootstrap interval. Pairs are (seed,
problem): the same seed draws the same prompts and evaluation noise for every method. Both
come from resampling seeds and problems with replacement (two-way bootstrap, B = 2000), so the
seed-to-seed spread counts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trb_nemo.config.compose import load_config
from trb_nemo.methods.table import METHOD_NAMES, METHODS, method_of
from trb_nemo.train.metrics_log import read_jsonl
from trb_nemo.train.run_dir import RunFolder

BASELINE = "student"
BOOTSTRAP = 2000
RULES = ("best", "final")


COMPARE_KEYS = ("methods", "seeds", "sweep")
"""``compare.<key>=...`` overrides, the same as the flags (``compare.methods=[trb,veto]``)."""


def compare_overrides(overrides: list[str]) -> tuple[list[str], dict]:
    """Split ``compare.*`` overrides (NeMo-style, e.g. ``compare.methods=[student,trb]``,
    ``compare.seeds=[0,1,2]``, ``compare.sweep=true``) from the run overrides. An unknown
    ``compare.`` key or method is a ConfigError naming it."""
    from trb_nemo.config.schema import ConfigError

    rest, chosen = [], {}
    for item in overrides:
        key, _, value = item.partition("=")
        if not key.startswith("compare."):
            rest.append(item)
            continue
        name = key.removeprefix("compare.")
        if name not in COMPARE_KEYS:
            raise ConfigError(key, f"unknown key; compare takes {'|'.join(COMPARE_KEYS)}")
        if name == "sweep":
            chosen[name] = value.strip().lower() in ("true", "1", "yes")
            continue
        items = [v.strip() for v in value.strip().strip("[]").split(",") if v.strip()]
        if name == "methods":
            bad = [m for m in items if m not in METHOD_NAMES]
            if bad or not items:
                raise ConfigError(key, f"unknown method {bad}; one of {'|'.join(METHOD_NAMES)}")
        else:
            try:
                items = [int(v) for v in items]
            except ValueError:
                raise ConfigError(key, f"seeds are integers, got {value!r}") from None
        chosen[name] = items
    return rest, chosen


def run_name(method: str, point: int | None, seed: int) -> str:
    return f"compare/{method}{'' if point is None else f'-p{point}'}-seed{seed}"


def run_compare(overrides: list[str], seeds: list[int], methods=METHOD_NAMES,
                sweep: bool = False) -> Path:
    """Run (or resume, or reuse) every run, then write the table and the plot."""
    from trb_nemo.commands.train import run_train

    base = load_config(overrides)
    root = Path(base.logging.output_dir) / "compare"
    runs = {}
    for method in methods:
        points = list(enumerate(method_of(method).sweep)) if sweep else [(None, ())]
        for point, extra in points:
            for seed in seeds:
                name = run_name(method, point, seed)
                cfg = load_config([*overrides, f"rollout.behavior={method}", *extra,
                                   f"seed={seed}", f"rollout.seed={seed}",
                                   f"logging.run_name={name}"])
                run = RunFolder.of(cfg)
                if not run.report.is_file():
                    print(f"trb-nemo compare: {name}", flush=True)
                    run_train(cfg)
                runs[(method, point, seed)] = read_jsonl(run.metrics)
    root.mkdir(parents=True, exist_ok=True)
    table = format_table(runs, methods, seeds, base)
    (root / "table.md").write_text(table)
    plot_curves(root / "pass_at_1.png", runs, methods, seeds, overrides)
    print(table)
    return root / "table.md"


def _evals(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "eval/pass@1" in r]


def selected(rows: list[dict], rule: str) -> dict | None:
    """The evaluation row ``rule`` picks: ``best`` (highest pass@1, the earliest on ties) or
    ``final`` (the last); None without evaluations."""
    evals = _evals(rows)
    if not evals:
        return None
    if rule == "final":
        return evals[-1]
    return max(evals, key=lambda r: (r["eval/pass@1"], -r["step"]))


def _rates(row: dict) -> torch.Tensor:
    """Per-problem pass@1 [problems] fp64 of an evaluation row. With several evaluation sets
    each problem's rate is scaled by P / (sets x its set's size), so the plain mean over the
    P problems is the mean over sets (the paper's "Avg", ``eval/pass@1``), not a mean that
    weighs sets by their size."""
    rates = (torch.tensor(row["eval/correct_per_problem"], dtype=torch.float64)
             / torch.as_tensor(row["eval/samples_per_problem"], dtype=torch.float64))
    sizes = row.get("eval/problems_per_set", [len(rates)])
    if len(sizes) > 1:
        weight = torch.cat([torch.full((n,), len(rates) / (len(sizes) * n),
                                       dtype=torch.float64) for n in sizes])
        rates = rates * weight
    return rates


def rate_matrix(runs: dict, method: str, point, seeds, rule: str) -> torch.Tensor | None:
    """[seeds, problems] per-problem pass@1 of the selected checkpoint of each seed's run."""
    rows = [selected(runs.get((method, point, s), []), rule) for s in seeds]
    if any(r is None or "eval/correct_per_problem" not in r for r in rows):
        return None
    return torch.stack([_rates(r) for r in rows])


def bootstrap(values_SP: torch.Tensor, baseline_SP: torch.Tensor | None = None,
              resamples: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Mean of [seeds, problems] values with its two-way bootstrap standard error; with a
    baseline of the same shape also the mean paired difference and its 95% percentile
    interval (the same resampled seeds and problems for both)."""
    values_SP = values_SP.double()
    baseline_SP = None if baseline_SP is None else baseline_SP.double()
    s, p = values_SP.shape
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, s, (resamples, s), generator=g)
    cols = torch.randint(0, p, (resamples, p), generator=g)

    def means(x):  # [resamples]: the mean of each resampled seeds x problems table
        return x[rows].gather(2, cols[:, None, :].expand(-1, s, -1)).mean(dim=(1, 2))

    boot = means(values_SP)
    out = {"mean": float(values_SP.mean()), "se": float(boot.std())}
    if baseline_SP is not None:
        diff = boot - means(baseline_SP)
        lo, hi = torch.quantile(diff, torch.tensor([0.025, 0.975], dtype=torch.float64))
        out.update({"diff": float((values_SP - baseline_SP).mean()), "lo": float(lo),
                    "hi": float(hi)})
    return out


def _best_point(runs, method, seeds):
    """The sweep point (None without a sweep) whose mean best-checkpoint pass@1 is highest."""
    points = sorted({k[1] for k in runs if k[0] == method}, key=lambda x: -1 if x is None else x)
    scored = []
    for point in points:
        m = rate_matrix(runs, method, point, seeds, "best")
        if m is not None:
            scored.append((float(m.mean()), point))
    return max(scored, key=lambda t: (t[0], -(t[1] or 0)))[1] if scored else None


def format_table(runs: dict, methods, seeds, cfg) -> str:
    """Markdown: per method, pass@1 (%) before training, at the best and the final checkpoint
    (mean ± standard error over seeds x problems) and the paired difference to vanilla OPD
    with its 95% bootstrap interval."""
    lines = [f"pass@1 (%) at temperature {cfg.eval.temperature}, {cfg.eval.num_samples} samples "
             f"per held-out problem, {cfg.optim.max_steps} steps, evaluation every "
             f"{cfg.eval.interval} steps, seeds {list(seeds)}. Mean ± standard error over "
             f"seeds x problems; Δ = method - vanilla OPD, paired by seed and problem, with its "
             f"95% two-way bootstrap interval ({BOOTSTRAP} resamples).", "",
             "| Method | point | before | best checkpoint | Δ best | final | Δ final |",
             "|---|---|---|---|---|---|---|"]
    base_point = _best_point(runs, BASELINE, seeds)
    for method in methods:
        point = _best_point(runs, method, seeds)
        cells = [METHODS[method].label,
                 "-" if point is None else " ".join(method_of(method).sweep[point])]
        before = [_evals(runs.get((method, point, s), [])) for s in seeds]
        firsts = [e[0]["eval/pass@1"] for e in before if e]
        cells.append(f"{100 * sum(firsts) / len(firsts):.1f}" if firsts else "-")
        for rule in RULES:
            m = rate_matrix(runs, method, point, seeds, rule)
            b = rate_matrix(runs, BASELINE, base_point, seeds, rule)
            if m is None:
                cells += ["-", "-"]
                continue
            paired = b is not None and b.shape == m.shape and method != BASELINE
            r = bootstrap(m, b if paired else None)
            cells.append(f"{100 * r['mean']:.1f} ± {100 * r['se']:.1f}")
            cells.append(f"{100 * r['diff']:+.1f} [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}]"
                         if paired else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(path: Path, runs: dict, methods, seeds, overrides: list[str]) -> bool:
    """pass@1 against step, one line per method (mean over seeds at its reported point), each
    method's warmup shaded in its color. False where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, method in enumerate(methods):
        point = _best_point(runs, method, seeds)
        by_step: dict[int, list[float]] = {}
        for s in seeds:
            for r in _evals(runs.get((method, point, s), [])):
                by_step.setdefault(r["step"], []).append(r["eval/pass@1"])
        if not by_step:
            continue
        steps = sorted(by_step)
        color = f"C{i}"
        ax.plot(steps, [sum(by_step[k]) / len(by_step[k]) for k in steps], marker="o",
                markersize=3, color=color, label=METHODS[method].label)
        extra = method_of(method).sweep[point] if point is not None else ()
        warmup, _ = method_of(method).warmup(load_config([*overrides, f"rollout.behavior={method}",
                                                          *extra]))
        if warmup > 0:
            ax.axvspan(0, warmup, color=color, alpha=0.08, lw=0)
    ax.set_xlabel("step")
    ax.set_ylabel("pass@1 (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("warmups shaded")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(args) -> int:
    """`trb-nemo compare [a.b=c ...] [--seeds ...] [--methods ...] [--sweep]`."""
    overrides, chosen = compare_overrides(args.overrides)  # compare.methods=[..] etc.
    methods = chosen.get("methods", args.behaviors)
    seeds = chosen.get("seeds", args.seeds)
    sweep = chosen.get("sweep", args.sweep)
    load_config(overrides)  # one-line errors before the first run starts
    run_compare(overrides, [int(s) for s in seeds], tuple(methods), sweep=bool(sweep))
    return 0
