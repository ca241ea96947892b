"""Rollout aggregates on a hand-built rollout: every statistic is over response prefixes only.

Run: .venv/bin/python -m pytest tests/unit/test_rollout_stats.py
"""

import math

import torch

from trb_nemo.rollout.stats import summarize
from trb_nemo.rollout.types import RECORDS, Rollout


def _rollout():
    mask = torch.tensor([[False, True, True, False], [True, True, True, True]])
    nan = torch.full((2, 4), float("nan"))
    records = {k: nan.clone() for k in RECORDS}
    records["beta"][mask] = torch.tensor([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    records["kl"][mask] = torch.tensor([0.0, 0.01, 0.02, 0.005, 0.015, 0.02])
    records["injected"][mask] = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    records["student_logprob"][mask] = -1.0
    records["teacher_logprob"][mask] = torch.tensor([-2.0, -4.0, -2.0, -2.0, -2.0, -2.0])
    return Rollout(torch.zeros(2, 5, dtype=torch.long), torch.tensor([2, 1]), torch.tensor([2, 4]),
                   mask, records, torch.zeros(2, 4, 3, dtype=torch.long), None,
                   torch.tensor([True, False]),
                   {"student": 5, "teacher": 3, "student_positions": 10, "teacher_positions": 9},
                   seconds=2.0)


def test_summary_values():
    s = summarize(_rollout(), eps=0.02)
    assert s["rollout/tokens"] == 6
    assert math.isclose(s["rollout/beta_mean"], 0.5, rel_tol=1e-6)
    assert math.isclose(s["rollout/beta_p50"], 0.5, rel_tol=1e-6)
    assert math.isclose(s["rollout/kl_max"], 0.02, rel_tol=1e-6)
    assert math.isclose(s["rollout/kl_over_eps"], 1.0, rel_tol=1e-6)
    assert math.isclose(s["rollout/teacher_token_share"], 0.5, rel_tol=1e-6)
    assert math.isclose(s["rollout/teacher_logprob_mean"], -14 / 6, rel_tol=1e-6)
    assert s["rollout/response_length_mean"] == 3 and s["rollout/stopped_share"] == 0.5
    assert math.isclose(s["rollout/tokens_per_second"], 3.0, rel_tol=1e-6)
    assert math.isclose(s["rollout/teacher_positions_per_token"], 1.5, rel_tol=1e-6)


def test_speculative_acceptance_and_the_bar():
    from trb_nemo.config.schema import LoggingConfig
    from trb_nemo.train.metrics_log import MetricsLog

    r = _rollout()
    assert "rollout/draft_acceptance" not in summarize(r, eps=0.02)
    r.forwards.update({"drafts_accepted": 27, "drafts_rejected": 3, "rounds": 4})
    s = summarize(r, eps=0.02)
    assert math.isclose(s["rollout/draft_acceptance"], 0.9) and s["rollout/draft_rounds"] == 4
    log = MetricsLog.__new__(MetricsLog)  # only the live progress-bar fields
    log.enabled, log.cfg, log.tb, log.bar, log.live = True, LoggingConfig(jsonl=False), None, None, {}
    log.log(1, s)
    assert log.live["accept"] == 0.9
    log.log(2, summarize(_rollout(), eps=0.0))  # after the warmup: no drafts, no field
    assert "accept" not in log.live and log.live["eps"] == 0.0


def _eval(step, correct, n=2):
    return {"step": step, "eval/pass@1": sum(correct) / (n * len(correct)),
            "eval/correct_per_problem": correct, "eval/samples_per_problem": n}


def test_compare_table_standard_errors_and_paired_intervals():
    from trb_nemo.commands.compare import bootstrap, format_table, selected
    from trb_nemo.config.compose import load_config

    runs = {("student", None, 0): [_eval(0, [0, 1, 0, 0]), _eval(5, [1, 1, 0, 1]),
                                   _eval(10, [1, 0, 0, 1])],
            ("student", None, 1): [_eval(0, [0, 1, 0, 1]), _eval(5, [1, 1, 1, 1]),
                                   _eval(10, [1, 1, 0, 1])],
            ("trb", None, 0): [_eval(0, [0, 1, 0, 0]), _eval(5, [2, 2, 1, 1]),
                               _eval(10, [2, 2, 1, 2])],
            ("trb", None, 1): [_eval(0, [0, 1, 0, 1]), _eval(5, [2, 1, 1, 2]),
                               _eval(10, [2, 2, 2, 1])]}
    assert selected(runs[("student", None, 0)], "best")["step"] == 5
    assert selected(runs[("trb", None, 0)], "final")["step"] == 10
    table = format_table(runs, ["student", "trb"], [0, 1], load_config())
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    # vanilla: best checkpoints of the two seeds average (3/8 + 4/8)/2 = 43.75% (paired with itself: no Δ)
    assert " 43.8 ± " in rows["Vanilla OPD"] and rows["Vanilla OPD"].endswith("| - |")
    trb = rows["TRB (ours)"]
    assert " 87.5 ± " in trb  # the final checkpoints: 7/8 and 7/8
    assert "+" in trb.split(" | ")[4]  # Δ best is positive with its interval
    b = bootstrap(torch.ones(2, 4), torch.zeros(2, 4))
    assert b["mean"] == 1 and b["se"] == 0 and b["diff"] == 1 and b["lo"] == b["hi"] == 1
    noisy = bootstrap(torch.rand(3, 50, generator=torch.Generator().manual_seed(0)))
    assert 0.01 < noisy["se"] < 0.1
