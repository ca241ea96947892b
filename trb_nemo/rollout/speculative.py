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
tokens (each a decode step of :meth:`SequenceCache.step`: static buffers, CUDA graphs), 1 to g
tokens kept per sequence; the drafts and the verdict move between stages by broadcasts (no
host sync), and the round makes one host sync: the read of each sequence's kept count and end
(the scheduler's cache lengths and slots follow from it).
"""

from __future__ import annotations

import torch

from trb_nemo.ops.sampling import RowNoise
from trb_nemo.ops.speculative import draft, verify
from trb_nemo.ops.vocab_parallel import logprobs_and_topk, logprobs_at
from trb_nemo.parallel import groups
from trb_nemo.rollout.decoder import GEN, POS, SEQ, Decoder
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

    def _after_compact(self, live: int) -> None:
        pass  # the next round feeds each sequence's pending token

    def _round(self, live: list[int]) -> list[bool]:
        """One draft/verify round of every live sequence (slots [0, len(live))); which ended."""
        g, rows, dev, pg = self.g, len(live), self.device, self.pg
        group, vocab = pg.tensor, self.vocab
        st = self.slot_SC[:rows]
        # copies: the slots' state moves on in _keep; pos0: the pending token's position
        seq_B, pos0_B = st[:, SEQ].clone(), st[:, POS].clone()
        id_B = self.ids_all[seq_B]
        student, teacher = self.caches
        fed_BG = teacher.step_tokens(g)[:rows]  # the teacher's static input: t, x_1 .. x_(g-1)
        fed_BG[:, 0] = self.tokens[seq_B, pos0_B]
        drafts_BG = torch.zeros(rows, g, dtype=torch.long, device=dev)
        zs_BGV = None
        for j in range(g):
            z = student.step(rows, fed_BG[:, j:j + 1])
            x = torch.zeros(rows, dtype=torch.long, device=dev)
            if pg.is_last_stage:
                zs = vocab.canonical(z, group)
                if zs_BGV is None:
                    zs_BGV = torch.empty(rows, g, zs.shape[-1], dtype=zs.dtype, device=dev)
                zs_BGV[:, j] = zs  # the step's output buffer is reused by the next draft
                x = draft(zs, RowNoise(self.key, id_B, pos0_B + j), vocab_group=group,
                          vocab_size=vocab.size)
            drafts_BG[:, j] = groups.broadcast_from_last_stage(x, pg)
            if j < g - 1:
                fed_BG[:, j + 1] = drafts_BG[:, j]
        zt = teacher.step(rows, None, all_positions=True, length=g)  # [B, g, V / TP], last stage
        verdict = torch.zeros(2, rows, g, dtype=torch.long, device=dev)  # ids, accepted
        if pg.is_last_stage:
            verdict = self._verify(seq_B, pos0_B, id_B, zs_BGV, vocab.canonical(zt, group),
                                   drafts_BG)
        verdict = groups.broadcast_from_last_stage(verdict, pg)
        return self._keep(live, seq_B, pos0_B, verdict)

    def _verify(self, seq_B, pos0_B, id_B, zs_BGV, zt_BGV, drafts_BG) -> torch.Tensor:
        """Last stage: verify the B x g drafts and keep every prefix's records for
        :meth:`_keep`. Returns [2, B, g] int64: the token at each prefix (the draft where
        accepted, else the residual draw) and the acceptances."""
        rows, g, v = zs_BGV.shape
        group, vocab, policy = self.pg.tensor, self.vocab, self.policy
        offs_G = torch.arange(g, device=self.device)
        zs, zt = zs_BGV.reshape(rows * g, v), zt_BGV.reshape(rows * g, v)
        noise = RowNoise(self.key, id_B.repeat_interleave(g, output_size=rows * g),
                         (pos0_B[:, None] + offs_G).reshape(-1))
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

    def _keep(self, live, seq_B, pos0_B, verdict) -> list[bool]:
        """Every rank: each sequence keeps its drafts up to the first rejection and that
        prefix's replacement, cut at the stop id and the length cap, all on the device; tokens
        and records are written (the rest of the round's g columns go to the scratch column),
        both caches roll back to the kept prefix. 1 host sync: the kept counts, the leading
        acceptances and the ends (:meth:`_read`)."""
        g, rows = self.g, len(live)
        st = self.slot_SC[:rows]
        ids_BG, accepted_BG = verdict[0], verdict[1]
        offs_G = torch.arange(g, device=self.device)
        leading_B = accepted_BG.cumprod(dim=1).sum(dim=1)
        keep_B = torch.minimum((leading_B + 1).clamp(max=g), self.max_new - st[:, GEN])
        stop_BG = (ids_BG == self.vocab.stop_id) & (offs_G < keep_B[:, None])
        stop_B = stop_BG.any(dim=1)
        keep_B = torch.where(stop_B, torch.where(stop_BG, offs_G, g).amin(dim=1) + 1, keep_B)
        kept_BG = offs_G < keep_B[:, None]
        pos_BG = torch.where(kept_BG, pos0_B[:, None] + offs_G, self.width)  # scratch: width
        seq_BG = seq_B[:, None].expand(rows, g)
        self.tokens[seq_BG, torch.where(kept_BG, pos_BG + 1, self.width)] = ids_BG
        if self.pg.is_last_stage:
            values, top, teacher_top = self._pending
            self.records_BSN[seq_BG, pos_BG] = values
            self.topk_ids[seq_BG, pos_BG] = top
            self.teacher_topk[seq_BG, pos_BG] = teacher_top
        st[:, GEN] += keep_B
        st[:, POS] += keep_B
        self.stopped_N[seq_B] = stop_B
        ended_B = stop_B | (st[:, GEN] >= self.max_new)
        host = self._read(torch.stack([keep_B, leading_B, ended_B.long()], dim=1))
        ended = []
        for i, (k, r, end) in zip(live, host, strict=True):
            self.accepted += r
            self.rejected += int(r < g)
            self.generated[i] += k
            ended.append(bool(end))
        for c in self.caches:  # back to pos0 + kept (each fed pos0 + g)
            c.truncate([n - g + k for n, (k, _, _) in zip(c.lengths, host, strict=False)],
                       pos0_B + keep_B)
        self.rounds += 1
        return ended

    def result(self) -> Rollout:
        rollout = super().result()
        rollout.forwards.update({"draft_tokens": self.g, "drafts_accepted": self.accepted,
                                 "drafts_rejected": self.rejected, "rounds": self.rounds})
        return rollout
