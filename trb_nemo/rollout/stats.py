"""Aggregates of a rollout for logging: what TRB did and what it cost.

All statistics are over response prefixes (``loss_mask``) of this data-parallel rank's rows;
the trainer reduces them over DP. Percentiles are of the per-token beta.
"""

from __future__ import annotations

import torch

from trb_nemo.rollout.types import Rollout


def summarize(rollout: Rollout, eps: float | None = None) -> dict:
    """Flat dict of floats: beta mean/p10/p50/p90, realized KL mean/max (and vs eps),
    teacher-token share, teacher log-prob of visited prefixes, response lengths, tokens/s,
    teacher forward calls and teacher token positions per generated token, and under
    speculative TRB the draft acceptance rate and the draft/verify rounds."""
    mask = rollout.loss_mask
    n = int(mask.sum())
    out = {"rollout/tokens": float(n), "rollout/seconds": rollout.seconds,
           "rollout/tokens_per_second": n / max(rollout.seconds, 1e-9),
           "rollout/response_length_mean": float(rollout.response_lengths.float().mean()),
           "rollout/response_length_max": float(rollout.response_lengths.max()),
           "rollout/stopped_share": float(rollout.stopped.float().mean()),
           "rollout/teacher_forwards_per_token": rollout.forwards.get("teacher", 0) / max(n, 1),
           "rollout/teacher_positions_per_token":
               rollout.forwards.get("teacher_positions", 0) / max(n, 1)}
    if n == 0:
        return out
    beta = rollout.records["beta"][mask]
    q = torch.quantile(beta.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64,
                                                   device=beta.device))
    kl = rollout.records["kl"][mask]
    out.update({"rollout/beta_mean": float(beta.mean()), "rollout/beta_p10": float(q[0]),
                "rollout/beta_p50": float(q[1]), "rollout/beta_p90": float(q[2]),
                "rollout/kl_mean": float(kl.mean()), "rollout/kl_max": float(kl.max()),
                "rollout/teacher_token_share": float(rollout.records["injected"][mask].mean()),
                "rollout/student_logprob_mean": float(rollout.records["student_logprob"][mask].mean())})
    teacher_lp = rollout.records["teacher_logprob"][mask]
    if bool(torch.isfinite(teacher_lp).any()):
        out["rollout/teacher_logprob_mean"] = float(teacher_lp[torch.isfinite(teacher_lp)].mean())
    drafts = rollout.forwards.get("drafts_accepted", 0) + rollout.forwards.get("drafts_rejected", 0)
    if drafts:  # speculative TRB: the share of verified drafts accepted (>= 1 - sqrt(eps / 2))
        out["rollout/draft_acceptance"] = rollout.forwards["drafts_accepted"] / drafts
        out["rollout/draft_rounds"] = float(rollout.forwards["rounds"])
    if eps is not None:
        out["rollout/eps"] = float(eps)
        out["rollout/kl_over_eps"] = float(kl.max()) / eps if eps > 0 else 0.0
    return out
