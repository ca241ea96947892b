"""Behavior policies: how the next token of a rollout is drawn (``rollout.behavior``).

Each policy sees, at one decode position of B rows on the last pipeline stage, the
EOS-canonicalized vocab-parallel logits of the student ``zs [B, V_local]`` and (only when
:meth:`needs_teacher` is true) of the teacher ``zt``, and the rows' sampling noise
(:class:`~trb_nemo.ops.vocab_parallel.RowNoise`, keyed by sequence and position), and returns a
:class:`Choice`. Sampling is exact and TP-invariant (:func:`trb_nemo.ops.vocab_parallel.sample`);
every TP rank returns the same ids.

* ``student``: x ~ pi_S (vanilla OPD). The teacher is never run while decoding.
* ``trb``: x ~ mu_beta ∝ pi_S^(1-beta) pi_T^beta with beta the largest value such that
  KL(mu_beta || pi_S) <= eps_k (paper Eq. 1-2), eps_k from ``trb.schedule``. With eps_k = 0 it
  is exactly ``student`` (same draws, no teacher forward).
* ``fixed``: the same solver with the constant budget ``rollout.fixed_eps`` (paper baseline).
* ``skd``: x ~ pi_S; if x is outside the teacher's global top-K it is replaced by a draw from
  pi_T at temperature tau_T (interleaved teacher injection, paper baseline).
* ``temperature``: x ~ softmax(z_S / tau_k), tau_k linear from tau_0 back to
  ``rollout.temperature`` over ``rollout.temperature_warmup_steps`` (paper baseline).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trb_nemo.config.schema import RolloutConfig, TRBConfig
from trb_nemo.methods import method_of
from trb_nemo.ops.trust_region import behavior_logprobs, solve_beta_and_kl
from trb_nemo.ops.vocab_parallel import RowNoise, sample, topk


@dataclass
class Choice:
    """One decode position of B rows: ids [B] int64, beta [B], kl [B] = KL(mu || pi_S),
    injected [B] bool (the token came from the teacher instead of the student's draw)."""

    ids: torch.Tensor
    beta: torch.Tensor
    kl: torch.Tensor
    injected: torch.Tensor


def _student_only(ids):
    zeros = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
    return Choice(ids, zeros, zeros.clone(), torch.zeros_like(ids, dtype=torch.bool))


class StudentPolicy:
    """Vanilla OPD: sample the student at ``temperature``."""

    name = "student"

    def __init__(self, temperature: float = 1.0):
        self.temperature = temperature

    def needs_teacher(self) -> bool:
        return False

    def choose(self, zs, zt, noise: RowNoise, group, vocab_size) -> Choice:
        logits = zs if self.temperature == 1.0 else zs.float() / self.temperature
        return _student_only(sample(logits, noise=noise, vocab_group=group,
                                    vocab_size=vocab_size))


class TrustRegionPolicy:
    """TRB (annealed eps_k) and the fixed-eps baseline: sample mu_beta*."""

    def __init__(self, name: str, eps: float, tolerance: float = 1e-6, max_iterations: int = 40):
        self.name, self.eps = name, float(eps)
        self.tolerance, self.max_iterations = tolerance, max_iterations
        self._student = StudentPolicy()

    def needs_teacher(self) -> bool:
        return self.eps > 0

    def choose(self, zs, zt, noise: RowNoise, group, vocab_size) -> Choice:
        if self.eps == 0:
            return self._student.choose(zs, zt, noise, group, vocab_size)
        beta, kl = solve_beta_and_kl(zs, zt, self.eps, vocab_group=group, vocab_size=vocab_size,
                                     tolerance=self.tolerance, max_iterations=self.max_iterations)
        log_mu = behavior_logprobs(zs, zt, beta, vocab_group=group, vocab_size=vocab_size)
        ids = sample(log_mu, noise=noise, vocab_group=group, vocab_size=vocab_size)
        return Choice(ids, beta, kl, torch.zeros_like(ids, dtype=torch.bool))


class InjectionPolicy:
    """SKD-style interleaved teacher injection with the teacher's top-K and temperature tau_T."""

    name = "skd"

    TEACHER_STREAM = 1
    """Salt of the teacher's draws: a noise stream of their own."""

    def __init__(self, top_k: int, teacher_temperature: float):
        self.top_k, self.tau = top_k, teacher_temperature

    def needs_teacher(self) -> bool:
        return True

    def choose(self, zs, zt, noise: RowNoise, group, vocab_size) -> Choice:
        # the student's draws use ``noise`` exactly as the student policy does (same proposals
        # for the same seed); the teacher's draws come from a stream of their own
        proposal = sample(zs, noise=noise, vocab_group=group, vocab_size=vocab_size)
        _, top_ids = topk(zt, min(self.top_k, vocab_size), vocab_group=group, vocab_size=vocab_size)
        accepted = (top_ids == proposal.unsqueeze(-1)).any(-1)
        replacement = sample(zt.float() / self.tau, noise=noise.stream(self.TEACHER_STREAM),
                             vocab_group=group, vocab_size=vocab_size)
        ids = torch.where(accepted, proposal, replacement)
        choice = _student_only(ids)
        choice.injected = ~accepted
        return choice


def temperature_at(step: int, rollout: RolloutConfig) -> float:
    """tau_k: linear from ``temperature_start`` to ``temperature`` over the warmup steps."""
    k = rollout.temperature_warmup_steps
    if k == 0 or step >= k:
        return rollout.temperature
    return rollout.temperature_start + (rollout.temperature - rollout.temperature_start) * step / k


def policy_for(step: int, rollout: RolloutConfig, trb: TRBConfig):
    """The behavior policy of training step ``step`` (0-based): the method's own
    (:mod:`trb_nemo.methods`, named by ``rollout.behavior``)."""
    return method_of(rollout.behavior).policy(step, rollout, trb)
