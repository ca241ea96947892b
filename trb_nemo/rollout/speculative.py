"""Speculative TRB decoding: the student drafts ``g`` tokens, the teacher verifies them in one
forward, and every sequence is still an exact draw from the trust-region policy mu.

A round, for every live sequence at once (``g`` = ``rollout.draft_tokens``). Each sequence
enters it with a pending token t (the last token of its prefix h, not yet fed to either
network; the prefill leaves a prompt's last token pending):

1. the student feeds t, x_1, ..., x_(g-1), one token per forward, drafting x_(j+1) ~ pi_S at
   each prefix h_j = h x_1 .. x_j (its logits kept): g forwards of one token;
2. the teacher feeds the same g tokens in one forward and returns its logits at every one of
   them: the teacher's view of the g prefixes h_0 .. h_(g-1);
3. :func:`trb_nemo.ops.speculative.verify` solves beta* at the g prefixes together (one batched
   solve, eps_k as in non-speculative TRB), accepts x_j with probability mu(x_j) / pi_S(x_j)
   and draws a replacement from the residual (mu - pi_S)_+ at each prefix; a sequence keeps
   its drafts up to the first rejection and that prefix's replacement (1 to g tokens), cut at
   the stop id and at ``max_new_tokens``;
4. both caches roll back to the kept prefix (:meth:`SequenceCache.truncate`); the last kept
   token is the next round's pending token.

Every kept token is an exact draw from mu at its prefix, so a sequence has the distribution of
non-speculative TRB; the records at every kept prefix (beta, KL(mu || pi_S), log pi_S and log
pi_T of the token, the student's top-k and the teacher's log-probs there) are what the
non-speculative engine records there, from the same logits. Randomness is keyed by (seed,
sequence, position) in streams of its own (:mod:`trb_nemo.ops.speculative`), so the budget,
TP and PP change no token. Per round: g student forwards of one token, 1 teacher forward of g
tokens, 1 to g tokens kept per sequence; host syncs: the drafts (PP broadcast) and the
verification's result.
"""

from __future__ import annotations

import torch

from trb_nemo.ops.sampling import RowNoise
from trb_nemo.ops.speculative import draft, verify
from trb_nemo.ops.vocab_parallel import logprobs_and_topk, logprobs_at
from trb_nemo.parallel import groups
from trb_nemo.rollout.decoder import Decoder
from trb_nemo.rollout.types import RECORDS, Rollout


class SpeculativeDecoder(Decoder):
    """The scheduler of :func:`trb_nemo.rollout.engine.generate` with ``draft_tokens > 0`` and a
    trust-region policy (module docstring): :class:`~trb_nemo.rollout.decoder.Decoder`'s loop,
    with a draft/verify round as its step."""

    held_back = 1

    def __init__(self, *args, **kwargs):
        settings = args[4] if len(args) > 4 else kwargs["settings"]
        if settings.draft_tokens < 1:
            raise ValueError(f"draft_tokens must be >= 1, got {settings.draft_tokens}")
        self.g = settings.draft_tokens
        self.extra_positions = self.g  # drafts may run past a sequence's cap
        super().__init__(*args, **kwargs)
        self.accepted = 0
        self.rejected = 0
        self.rounds = 0

    def _admit(self, live: list[int], group: list[int]) -> None:
        self._prefill(len(live), group)  # every prompt but its last token (it is pending)

    def _step(self, live: list[int]) -> list[bool]:
        return self._round(live)

    def _after_compact(self, src: list[int]) -> None:
        pass  # the next round feeds each sequence's pending token

    def _round(self, live: list[int]) -> list[bool]:
        """One draft/verify round of every live sequence (slots [0, len(live))); which ended."""
        g, rows, dev, pg = self.g, len(live), self.device, self.pg
        group, vocab = pg.tensor, self.vocab
        seq_B = torch.tensor(live, dtype=torch.long, device=dev)
        pos0 = [self.plen[i] + self.generated[i] - 1 for i in live]  # the pending token's
        pos0_B = torch.tensor(pos0, dtype=torch.long, device=dev)
        id_B = self.ids_all[seq_B]
        student, teacher = self.caches
        fed = [self.tokens[seq_B, pos0_B]]
        drafts, zs_steps = [], []
        for j in range(g):
            z = self._feed_all(0, rows, fed[-1][:, None], [1] * rows, caches=[student])[0]
            x = torch.zeros(rows, dtype=torch.long, device=dev)
            if pg.is_last_stage:
                zs = vocab.canonical(z, group)
                zs_steps.append(zs)
                x = draft(zs, RowNoise(self.key, id_B, pos0_B + j), vocab_group=group,
                          vocab_size=vocab.size)
            drafts.append(groups.broadcast_from_last_stage(x, pg))
            if j < g - 1:
                fed.append(drafts[-1])
        zt = self._feed_all(0, rows, torch.stack(fed, dim=1), [g] * rows, caches=[teacher],
                            all_positions=True)[0]  # [B, g, V / TP] on the last stage
        verdict = torch.zeros(2, rows, g, dtype=torch.long, device=dev)  # ids, accepted
        if pg.is_last_stage:
            verdict = self._verify(seq_B, pos0_B, id_B, torch.stack(zs_steps, dim=1),
                                   vocab.canonical(zt, group), torch.stack(drafts, dim=1))
        verdict = groups.broadcast_from_last_stage(verdict, pg)
        return self._keep(live, pos0, seq_B, pos0_B, verdict)

    def _verify(self, seq_B, pos0_B, id_B, zs_BGV, zt_BGV, drafts_BG) -> torch.Tensor:
        """Last stage: verify the B x g drafts and keep every prefix's records for
        :meth:`_keep`. Returns [2, B, g] int64: the token at each prefix (the draft where
        accepted, else the residual draw) and the acceptances."""
        rows, g, v = zs_BGV.shape
        group, vocab, policy = self.pg.tensor, self.vocab, self.policy
        offs_G = torch.arange(g, device=self.device)
        zs, zt = zs_BGV.reshape(rows * g, v), zt_BGV.reshape(rows * g, v)
        noise = RowNoise(self.key, id_B.repeat_interleave(g), (pos0_B[:, None] + offs_G).reshape(-1))
        ver = verify(zs, zt, drafts_BG.reshape(-1), policy.eps, noise, vocab_group=group,
                     vocab_size=vocab.size, tolerance=policy.tolerance,
                     max_iterations=policy.max_iterations)
        logprob, top = logprobs_and_topk(zs, ver.ids[:, None], self.topk_k, vocab_group=group,
                                         vocab_size=vocab.size)
        at = logprobs_at(zt, torch.cat([ver.ids[:, None], top], dim=-1),
                                 vocab_group=group, vocab_size=vocab.size)
        values = torch.stack([ver.beta, ver.kl, torch.zeros_like(ver.beta), logprob[:, 0],
                              at[:, 0]], dim=-1)  # RECORDS order
        self._pending = (values.view(rows, g, len(RECORDS)), top.view(rows, g, -1),
                         at[:, 1:].view(rows, g, -1))
        return torch.stack([ver.ids.view(rows, g), ver.accepted.long().view(rows, g)])

    def _keep(self, live, pos0, seq_B, pos0_B, verdict) -> list[bool]:
        """Every rank: each sequence keeps its drafts up to the first rejection and that
        prefix's replacement, cut at the stop id and the length cap (1 host sync); tokens and
        records are written, both caches roll back to the kept prefix."""
        g = self.g
        ids, accepted = verdict.tolist()
        ended, keep = [], []
        for b, i in enumerate(live):
            r = next((j for j in range(g) if not accepted[b][j]), g)  # leading acceptances
            self.accepted += r
            self.rejected += int(r < g)
            new = ids[b][: min(r + 1, g)][: self.max_new - self.generated[i]]
            stop = self.vocab.stop_id in new
            if stop:
                new = new[: new.index(self.vocab.stop_id) + 1]
            k = len(new)
            keep.append(k)
            self.generated[i] += k
            self.stopped[i] = stop
            ended.append(stop or self.generated[i] >= self.max_new)
            for c in self.caches:
                c.truncate(b, pos0[b] + k)
        self.rounds += 1
        # the kept (row, draft) pairs as index tensors built on the host (a boolean mask would
        # cost a device sync per indexing on a GPU)
        b_K, j_K = zip(*[(b, j) for b, k in enumerate(keep) for j in range(k)], strict=True)
        b_K = torch.tensor(b_K, dtype=torch.long, device=self.device)
        j_K = torch.tensor(j_K, dtype=torch.long, device=self.device)
        seq_K, pos_K = seq_B[b_K], pos0_B[b_K] + j_K
        self.tokens[seq_K, pos_K + 1] = verdict[0][b_K, j_K]
        if self.pg.is_last_stage:
            values, top, teacher_top = self._pending
            self.records_BSN[seq_K, pos_K] = values[b_K, j_K]
            self.topk_ids[seq_K, pos_K] = top[b_K, j_K]
            self.teacher_topk[seq_K, pos_K] = teacher_top[b_K, j_K]
        return ended

    def result(self) -> Rollout:
        rollout = super().result()
        rollout.forwards.update({"draft_tokens": self.g, "drafts_accepted": self.accepted,
                                 "drafts_rejected": self.rejected, "rounds": self.rounds})
        return rollout
