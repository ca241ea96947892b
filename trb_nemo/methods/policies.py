"""Behavior policies: how the next token of a rollout is drawn (``rollout.behavior``).

Each policy is a dataclass of its settings (eps, temperature, ...) and exposes the
distribution it draws from, ``log_mu(zs, zt, group, vocab_size)`` (for diagnostics and the
speculative decoder), separately from ``choose``, which samples it.

Each policy sees, at one decode position of B rows on the last pipeline stage, the
EOS-canonicalized vocab-parallel logits of the student ``zs [B, V_local]`` and (only when
:meth:`needs_teacher` is true) of the teacher ``zt``, and the rows' sampling noise
(:class:`~trb_nemo.ops.sampling.RowNoise`, keyed by sequence and position), and returns a
:class:`Choice`. Sampling is exact and TP-invariant (:func:`trb_nemo.ops.sampling.sample`);
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

from trb_nemo.ops.sampling import RowNoise, sample
from trb_nemo.ops.shards import shard_start
from trb_nemo.ops.trust_region import behavior_logprobs, solve_beta, solve_beta_and_kl
from trb_nemo.ops.vocab_parallel import gather_at_ids, log_softmax, topk


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


@dataclass
class StudentPolicy:
    """Vanilla OPD: sample the student at ``temperature``."""

    temperature: float = 1.0
    name = "student"

    def needs_teacher(self) -> bool:
        return False

    def log_mu(self, zs, zt, group, vocab_size) -> torch.Tensor:
        """log softmax(z_S / temperature): [R, V_local] fp32 (no collective beyond the
        normalizer's all-gather [P, R, 2])."""
        return log_softmax(self._logits(zs), vocab_group=group, vocab_size=vocab_size)

    def _logits(self, zs):
        return zs if self.temperature == 1.0 else zs.float() / self.temperature

    def choose(self, zs, zt, noise: RowNoise, group, vocab_size) -> Choice:
        return _student_only(sample(self._logits(zs), noise=noise, vocab_group=group,
                                    vocab_size=vocab_size))


@dataclass
class TeacherPolicy:
    """The teacher's own samples at ``temperature`` (the SFT warmup's data)."""

    temperature: float = 1.0
    name = "teacher"

    def needs_teacher(self) -> bool:
        return True

    def log_mu(self, zs, zt, group, vocab_size) -> torch.Tensor:
        return StudentPolicy(self.temperature).log_mu(zt, None, group, vocab_size)

    def choose(self, zs, zt, noise: RowNoise, group, vocab_size) -> Choice:
        return StudentPolicy(self.temperature).choose(zt, None, noise, group, vocab_size)


@dataclass
class TrustRegionPolicy:
    """TRB (annealed eps_k) and the fixed-eps baseline: sample mu_beta*."""

    name: str
    eps: float
    tolerance: float = 1e-6
    max_iterations: int = 40

    def __post_init__(self):
        self.eps = float(self.eps)

    def needs_teacher(self) -> bool:
        return self.eps > 0

    def log_mu(self, zs, zt, group, vocab_size) -> torch.Tensor:
        """log mu_beta* [R, V_local] fp32 (pi_S at eps = 0)."""
        if self.eps == 0:
            return StudentPolicy().log_mu(zs, zt, group, vocab_size)
        beta = solve_beta(zs, zt, self.eps, vocab_group=group, vocab_size=vocab_size,
                          tolerance=self.tolerance, max_iterations=self.max_iterations)
        return behavior_logprobs(zs, zt, beta, vocab_group=group, vocab_size=vocab_size)

    def choose(self, zs, zt, noise: RowNoise, group, vocab_size) -> Choice:
        if self.eps == 0:
            return StudentPolicy().choose(zs, zt, noise, group, vocab_size)
        beta, kl = solve_beta_and_kl(zs, zt, self.eps, vocab_group=group, vocab_size=vocab_size,
                                     tolerance=self.tolerance, max_iterations=self.max_iterations)
        log_mu = behavior_logprobs(zs, zt, beta, vocab_group=group, vocab_size=vocab_size)
        ids = sample(log_mu, noise=noise, vocab_group=group, vocab_size=vocab_size)
        return Choice(ids, beta, kl, torch.zeros_like(ids, dtype=torch.bool))


@dataclass
class InjectionPolicy:
    """SKD-style interleaved teacher injection with the teacher's top-K and temperature tau_T."""

    top_k: int
    tau: float
    name = "skd"

    TEACHER_STREAM = 1
    """Salt of the teacher's draws: a noise stream of their own."""

    def needs_teacher(self) -> bool:
        return True

    def log_mu(self, zs, zt, group, vocab_size) -> torch.Tensor:
        """The distribution ``choose`` samples: mu(x) = pi_S(x) [x in K_T] + (1 - pi_S(K_T))
        q_tau(x), K_T the teacher's global top-K, q_tau = softmax(z_T / tau); [R, V_local] fp32.
        Collectives: top-k's all-gather, 2 normalizer all-gathers, 1 all-reduce of [R, K]."""
        log_p = log_softmax(zs, vocab_group=group, vocab_size=vocab_size)
        log_q = log_softmax(zt.float() / self.tau, vocab_group=group, vocab_size=vocab_size)
        _, top_ids = topk(zt, min(self.top_k, vocab_size), vocab_group=group,
                          vocab_size=vocab_size)
        kept = torch.logsumexp(gather_at_ids(log_p, top_ids, vocab_group=group), dim=-1)  # [R]
        cols = torch.arange(zs.shape[-1], device=zs.device) + shard_start(zs.shape[-1], group)
        in_top = (cols[None, None, :] == top_ids[:, :, None]).any(1)  # [R, V_local]
        rest = torch.log1p(-kept.exp().clamp(max=1.0)).unsqueeze(-1) + log_q
        return torch.where(in_top, torch.logaddexp(log_p, rest), rest)

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


