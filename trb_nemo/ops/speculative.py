"""Speculative TRB: exact draws from the trust-region policy mu with the student as the proposal.

At a prefix h with student logits z_S and teacher logits z_T (EOS-canonicalized, vocab-parallel
shards), mu = mu_beta* (paper Eq. 1-2, :mod:`trb_nemo.ops.trust_region`) and p = pi_S. A draft
x ~ p is accepted with probability min(1, mu(x) / p(x)); otherwise the token is drawn from the
residual (mu - p)_+ / sum (mu - p)_+. By the speculative-sampling argument (Leviathan et al.,
Chen et al.) the result is an exact draw from mu, whatever p is: P(y) = p(y) min(1, mu(y)/p(y))
+ (1 - sum_x min(p, mu)) (mu(y) - p(y))_+ / sum (mu - p)_+ = min(p, mu)(y) + (mu - p)_+(y) =
mu(y). Since KL(mu || p) <= eps, Pinsker gives an acceptance rate 1 - TV(mu, p) >= 1 -
sqrt(eps / 2).

Randomness is keyed like every draw of the rollout engine
(:class:`~trb_nemo.ops.sampling.RowNoise`: seed, sequence, position), in streams of its
own: the student's draft (``DRAFT_STREAM``), the acceptance uniform (``ACCEPT_STREAM``, one per
row, identical on every TP rank), the residual draw (``RESIDUAL_STREAM``). So a sequence's
tokens do not depend on TP, PP, the batch or the budget.

Shape legend: ``R`` rows (one per prefix), ``V`` local vocab shard (V_pad / TP); ``vocab_size``
is the true vocabulary (padding has probability zero).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trb_nemo.ops.sampling import RowNoise, row_uniforms, sample
from trb_nemo.ops.shards import NEG_INF
from trb_nemo.ops.trust_region import behavior_logprobs, solve_beta_and_kl
from trb_nemo.ops.vocab_parallel import gather_at_ids, log_softmax

DRAFT_STREAM = 11
ACCEPT_STREAM = 12
RESIDUAL_STREAM = 13

RESIDUAL_FLOOR = 1e4
"""Where the residual is zero its log is replaced by log mu - RESIDUAL_FLOOR: such a column can
never win the Gumbel-max against one with positive residual (Gumbel noise lies in about
[-3.6, 36.7], a positive fp32 residual's log is above -104), and a row whose residual is zero
everywhere (mu = p: its draft is always accepted) still has a finite row to draw from."""


def draft(zs_RV: torch.Tensor, noise: RowNoise, *, vocab_group=None,
          vocab_size: int | None = None) -> torch.Tensor:
    """The student's draft x ~ pi_S at each row: ids [R] int64, identical on every rank.
    Collectives: 1 all-gather of [P, R, 2]."""
    return sample(zs_RV, noise=noise.stream(DRAFT_STREAM), vocab_group=vocab_group,
                  vocab_size=vocab_size)


def acceptance_uniform(noise: RowNoise) -> torch.Tensor:
    """One U(0, 1) per row [R] fp64 from the acceptance stream (no collective: every rank draws
    the same, it depends on the row's key and counter only)."""
    return row_uniforms(noise.stream(ACCEPT_STREAM))


@dataclass
class Verified:
    """The verification of R drafts: ``ids`` [R] (the draft where accepted, else the residual
    draw), ``accepted`` [R] bool, ``beta`` [R] and ``kl`` [R] = KL(mu || pi_S) of the prefix."""

    ids: torch.Tensor
    accepted: torch.Tensor
    beta: torch.Tensor
    kl: torch.Tensor


def verify(zs_RV: torch.Tensor, zt_RV: torch.Tensor, draft_R: torch.Tensor, eps: float,
           noise: RowNoise, *, vocab_group=None, vocab_size: int | None = None,
           tolerance: float = 1e-6, max_iterations: int = 40) -> Verified:
    """Accept or replace each row's draft (drawn from pi_S of the row's prefix) so that the
    row's token is an exact draw from mu_beta*, beta* solved for ``eps`` (module docstring).

    Per row: beta*, log mu and log pi_S on the local shard; accept when u < mu(x) / pi_S(x)
    (u from :func:`acceptance_uniform`); the replacement is a Gumbel-max draw from log (mu -
    pi_S)_+ on each rank's own columns, no gather of the vocabulary. Every rank returns the
    same result. Collectives: those of :func:`~trb_nemo.ops.trust_region.solve_beta_and_kl`,
    1 all-gather [P, R, 2] each for log mu and log pi_S, 1 all-reduce(SUM) [2, R, 1] for their
    values at the drafts, 1 all-gather [P, R, 2] for the residual draw.
    """
    beta, kl = solve_beta_and_kl(zs_RV, zt_RV, eps, vocab_group=vocab_group,
                                 vocab_size=vocab_size, tolerance=tolerance,
                                 max_iterations=max_iterations)
    log_mu = behavior_logprobs(zs_RV, zt_RV, beta, vocab_group=vocab_group,
                               vocab_size=vocab_size)
    log_p = log_softmax(zs_RV, vocab_group=vocab_group, vocab_size=vocab_size)
    at = gather_at_ids(torch.stack([log_mu, log_p]), draft_R[None, :, None].expand(2, -1, 1),
                       vocab_group=vocab_group)[..., 0]  # [2, R]
    ratio = torch.exp(at[0].double() - at[1].double())
    accepted = acceptance_uniform(noise) < ratio
    residual = (log_mu.exp() - log_p.exp()).clamp_min(0.0)
    log_residual = torch.where(residual > 0, residual.log(), log_mu - RESIDUAL_FLOOR)
    log_residual = torch.where(torch.isfinite(log_mu), log_residual, NEG_INF)
    replacement = sample(log_residual, noise=noise.stream(RESIDUAL_STREAM),
                         vocab_group=vocab_group, vocab_size=vocab_size)
    return Verified(torch.where(accepted, draft_R, replacement), accepted, beta, kl)
