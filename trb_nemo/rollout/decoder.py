"""The decoder: continuous batching of student (and teacher) sequences over per-sequence KV
caches, one scheduling loop for plain and speculative decoding (:mod:`trb_nemo.rollout.engine`
has the contract; :mod:`trb_nemo.rollout.speculative` the speculative rounds).

Host and device split the work so that a decode step makes one host sync. The host schedules:
which sequence sits in which slot, how many positions each slot holds, how many tokens each
sequence generated; all of it follows from counts it already knows. The device holds what the
step computes with: per slot, the sequence, the position whose logits are pending, the tokens
generated and the token to feed next (``slot_SC``, moved with the slots), the outputs, and the
failed-input-check flags (:mod:`trb_nemo.ops.checks`, read once at the end). The one sync per
step is the read of which sequences ended (and, speculative, how many tokens each kept):
:meth:`Decoder._read`, one device-to-host copy into a pinned buffer.
"""

from __future__ import annotations

import time

import torch

from trb_nemo.models.gpt import fp8_padded_length
from trb_nemo.models.vocab import SharedVocab
from trb_nemo.ops import checks
from trb_nemo.ops.sampling import RowNoise
from trb_nemo.ops.vocab_parallel import logprobs_and_topk, logprobs_at
from trb_nemo.parallel import groups
from trb_nemo.parallel.groups import ParallelGroups
from trb_nemo.rollout.kv_cache import SequenceCache
from trb_nemo.rollout.types import (
    RECORDS,
    DecodeSettings,
    Interrupt,
    Rollout,
    StopRequested,
    TeacherStats,
)

PREFILL_PADDING = 1.25
"""A prefill sub-batch takes prompts (longest first) while its padded size rows x longest
stays within this factor of the prompt tokens it holds."""


SEQ, POS, GEN, TOK = range(4)
"""Columns of the decoder's per-slot state ``slot_SC``: the sequence, the position whose
logits are pending (the last token of its prefix), tokens generated, the token to feed next."""


class Decoder:
    """The scheduler and the records of one :func:`~trb_nemo.rollout.engine.generate` call.

    One scheduling loop for every decoder (:meth:`run`): admit waiting sequences into free
    slots (:meth:`_admit`), advance every live sequence (:meth:`_step`: one token here, one
    draft/verify round in :class:`~trb_nemo.rollout.speculative.SpeculativeDecoder`), drop the
    ended ones (:meth:`_compact`) and let the survivors feed what they drew
    (:meth:`_after_compact`)."""

    extra_positions = 0
    """Cache positions per sequence beyond prompt + max_new_tokens (speculative drafts)."""
    held_back = 0
    """Prompt tokens the prefill leaves unfed (the speculative decoder feeds the last one with
    the first drafts)."""

    INTERRUPT_EVERY = 64
    """Scheduling steps between two asks of the interrupt (one all-reduce of [1] over the
    model-parallel group: about every second or two of decoding on a GPU)."""

    def __init__(self, student, teacher, prompts: list[list[int]], policy,
                 settings: DecodeSettings, *, ids: list[int], vocab: SharedVocab,
                 generator: torch.Generator, pg: ParallelGroups,
                 interrupt: Interrupt | None = None):
        self.t0 = time.perf_counter()
        self.interrupt = interrupt
        self.prompts, self.policy, self.vocab, self.pg = prompts, policy, vocab, pg
        self.settings = settings
        max_new_tokens, topk_k = settings.max_new_tokens, settings.topk_k
        self.max_new, self.prefill_tokens = max_new_tokens, settings.prefill_tokens
        self.device = device = next(student.parameters()).device
        n = len(prompts)
        self.plen = [len(p) for p in prompts]
        self.width = max(self.plen) + max_new_tokens
        # one scratch column past the width: masked-off writes of a step land there
        tokens = torch.zeros(n, self.width + 1, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        self.tokens = tokens.to(device)
        self.ids_all = torch.tensor(ids, dtype=torch.long, device=device)
        # one key per call from the CPU generator (no device sync); rows keyed by (id, position)
        self.key = int(torch.randint(-(2**62), 2**62, (1,), generator=generator))
        # Under FP8 every forward feeds a multiple of 16 rows (TE's FP8 GEMMs): the cache has
        # the budget rounded up to that many slots and extra rows feed nothing
        fp8 = next((m.config.fp8 for m in (student, teacher) if m is not None
                    and m.config.fp8 is not None), None)
        m = self.rows_multiple = settings.rows_multiple or fp8_padded_length(1, fp8)
        self.budget = min(settings.max_in_flight, n)
        room = self.width + self.extra_positions
        graphs = settings.cuda_graphs and device.type == "cuda"
        self.caches = [SequenceCache(net, self.budget, room, pg, m, graphs)
                       for net in (student, teacher) if net is not None]
        slots = self.caches[0].slots
        self.slot_SC = torch.zeros(slots, 4, dtype=torch.long, device=device)
        self._host = torch.zeros(slots, 3, dtype=torch.long,
                                 pin_memory=device.type == "cuda")
        self.prefill_len = [k - self.held_back for k in self.plen]
        self.records_BSN = torch.full((n, self.width + 1, len(RECORDS)), float("nan"),
                                      device=device)
        self.topk_k = topk_k
        self.topk_ids = torch.zeros(n, self.width + 1, topk_k, dtype=torch.long, device=device)
        self.teacher_topk = (torch.full((n, self.width + 1, topk_k), float("nan"), device=device)
                             if teacher is not None else None)
        self.stopped_N = torch.zeros(n, dtype=torch.bool, device=device)
        self.generated = [0] * n
        self.checks = checks.DeferredChecks()
        self.steps = 0

    # ------------------------------------------------------------------------- scheduling

    def run(self) -> None:
        """Decode every sequence (the outputs are written in place; :meth:`result`). The input
        checks of the per-token ops are deferred to the end (one read of their flags)."""
        n = len(self.prompts)
        # longest prompts first: admitted groups then pad little (the order changes no result)
        waiting = sorted(range(n), key=lambda i: -self.plen[i])
        live: list[int] = []  # sequence in slot s = live[s]
        try:
            with checks.deferred(self.checks):
                while live or waiting:
                    free = self.budget - len(live)
                    if free and waiting:
                        group, waiting = waiting[:free], waiting[free:]
                        self._admit(live, group)
                        live += group
                    ended = self._step(live)
                    live = self._compact(live, ended)
                    if live:
                        self._after_compact(len(live))
                    self.steps += 1
                    if (self.interrupt is not None and self.steps % self.INTERRUPT_EVERY == 0
                            and (live or waiting) and self.interrupt.requested(self.pg.model)):
                        raise StopRequested()  # the model-parallel group agreed: all stop here
            self.checks.raise_first()
        finally:
            for c in self.caches:
                c.release()

    def _admit(self, live: list[int], group: list[int]) -> None:
        """Prefill ``group`` into the slots after ``live``'s; their last logits join the
        pending ones (per network: [len(live), V / TP])."""
        new = self._prefill(len(live), group)
        self.pending = new if not live else [
            None if z is None else torch.cat([z, zn])
            for z, zn in zip(self.pending, new, strict=True)]

    def _step(self, live: list[int]) -> list[bool]:
        """Every live sequence draws its next token from the pending logits; which ended."""
        chosen = self._choose(len(live), self.pending)
        return self._advance(live, chosen)

    def _after_compact(self, live: int) -> None:
        """Every live sequence (slots [0, live)) feeds the token it drew: its next logits."""
        tokens_B1 = self.slot_SC[:live, TOK:TOK + 1]
        self.pending = [c.step(live, tokens_B1) for c in self.caches]

    def _padded_rows(self, lo: int, hi: int) -> tuple[int, int]:
        """Slots [lo', hi') covering [lo, hi) with a multiple of ``rows_multiple`` rows."""
        m = self.rows_multiple
        rows = -(-(hi - lo) // m) * m
        slots = self.caches[0].slots
        lo2 = min(lo, slots - rows)
        return lo2, lo2 + rows

    def _feed_all(self, lo: int, hi: int, tokens_BL: torch.Tensor, counts: list[int]) -> list:
        """Every network feeds slots [lo, hi) (a prefill): logits of those rows at their last
        fed token (last stage) or None."""
        lo2, hi2 = self._padded_rows(lo, hi)
        if (lo2, hi2) != (lo, hi):
            full = torch.zeros(hi2 - lo2, tokens_BL.shape[1], dtype=torch.long, device=self.device)
            full[lo - lo2: hi - lo2] = tokens_BL
            counts = [0] * (lo - lo2) + counts + [0] * (hi2 - hi)
            tokens_BL = full
        out = [c.feed(lo2, tokens_BL, counts) for c in self.caches]
        return [None if z is None else z[lo - lo2: hi - lo2] for z in out]

    def _prefill(self, slot_lo: int, group: list[int]) -> list:
        """Prompts of ``group`` (longest first) into slots [slot_lo, ...): logits at each
        prompt's last token, per network. One forward per sub-batch of similar lengths. Sets
        the slots' state: the sequence, its pending position (its prompt's last), 0 generated,
        the token to feed next (the prompt's last: fed by the speculative decoder)."""
        out = [[] for _ in self.caches]
        for c in self.caches:
            for s in range(slot_lo, slot_lo + len(group)):
                c.start(s)
        lo, hi = slot_lo, slot_lo + len(group)
        last_pos = [self.plen[i] - 1 for i in group]
        self.slot_SC[lo:hi] = torch.tensor(
            [[i, p, 0, self.prompts[i][-1]] for i, p in zip(group, last_pos, strict=True)],
            dtype=torch.long, device=self.device)
        start = 0
        while start < len(group):  # sub-batches: rows x longest within both bounds
            longest, end, held = self.prefill_len[group[start]], start, 0
            while end < len(group) and (end - start + 1) * longest <= min(
                    max(self.prefill_tokens, longest),
                    PREFILL_PADDING * (held + self.prefill_len[group[end]])):
                held += self.prefill_len[group[end]]
                end += 1
            rows = group[start:end]
            chunk = max(1, self.prefill_tokens // len(rows))  # positions per forward
            last = None
            for c0 in range(0, longest, chunk):
                c1 = min(longest, c0 + chunk)
                counts = [max(0, min(self.prefill_len[i], c1) - c0) for i in rows]
                z = self._feed_all(slot_lo + start, slot_lo + end, self.tokens[rows, c0:c1],
                                   counts)
                if z[0] is None:  # not the last pipeline stage
                    continue
                ends_here = torch.tensor([c0 < self.prefill_len[i] <= c1 for i in rows],
                                         device=self.device)[:, None]
                last = z if last is None else [torch.where(ends_here, zn, prev)
                                               for prev, zn in zip(last, z, strict=True)]
            for k in range(len(self.caches)):
                out[k].append(None if last is None else last[k])
            start = end
        return [None if any(p is None for p in parts) else torch.cat(parts) for parts in out]

    def _compact(self, live: list[int], ended: list[bool]) -> list[int]:
        """Drop ended sequences; the last live ones move into the holes (their caches and slot
        state), so the live sequences keep slots [0, n). Returns the live sequences by slot.
        Host-indexed copies only (no index tensor built from host data)."""
        live = list(live)
        alive = [not e for e in ended]
        hole, last = 0, len(live) - 1
        while True:
            while hole < len(live) and alive[hole]:
                hole += 1
            while last >= 0 and not alive[last]:
                last -= 1
            if hole > last:
                break
            for c in self.caches:
                c.move(last, hole)
            self.slot_SC[hole] = self.slot_SC[last]
            live[hole] = live[last]
            alive[hole], alive[last] = True, False
        return live[: sum(alive)]

    def _read(self, values_BK: torch.Tensor) -> list[list[int]]:
        """The step's one host sync: ``values_BK`` [B, K <= 3] int64 copied into a pinned host
        buffer (on CUDA) and read as lists."""
        rows, k = values_BK.shape
        if values_BK.device.type != "cuda":
            return values_BK.tolist()
        host = self._host[:rows, :k]
        host.copy_(values_BK, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return host.tolist()

    # ------------------------------------------------------------------------ per step

    def _choose(self, rows: int, logits: list) -> torch.Tensor:
        """Each live sequence's next token [rows] (all ranks; written into ``tokens`` and the
        slots' state); records filled on the last stage."""
        st = self.slot_SC[:rows]
        seq_B, pos_B = st[:, SEQ].clone(), st[:, POS].clone()  # the state moves on after
        if self.pg.is_last_stage:
            chosen = self._choose_last_stage(logits, seq_B, pos_B)
        else:
            chosen = torch.zeros(rows, dtype=torch.long, device=self.device)
        chosen = groups.broadcast_from_last_stage(chosen, self.pg)
        self.tokens[seq_B, pos_B + 1] = chosen
        st[:, TOK] = chosen
        return chosen

    def _choose_last_stage(self, logits, seq_B, pos_B) -> torch.Tensor:
        group, vocab = self.pg.tensor, self.vocab
        zs = vocab.canonical(logits[0], group)
        zt = vocab.canonical(logits[1], group) if len(logits) > 1 else None
        noise = RowNoise(self.key, self.ids_all[seq_B], pos_B)
        choice = self.policy.choose(zs, zt, noise, group, vocab.size)
        logprob, top = logprobs_and_topk(zs, choice.ids[:, None], self.topk_k, vocab_group=group,
                                         vocab_size=vocab.size)
        self.topk_ids[seq_B, pos_B] = top
        values = [choice.beta, choice.kl, choice.injected, logprob[:, 0]]
        if zt is not None:
            at = logprobs_at(zt, torch.cat([choice.ids[:, None], top], dim=-1),
                             vocab_group=group, vocab_size=vocab.size)
            values.append(at[:, 0])
            self.teacher_topk[seq_B, pos_B] = at[:, 1:]
        # one write of every record (RECORDS order) at these positions
        self.records_BSN[seq_B, pos_B, : len(values)] = torch.stack(
            [v if v.dtype == torch.float32 else v.float() for v in values], dim=-1)
        return choice.ids

    def _advance(self, live: list[int], chosen: torch.Tensor) -> list[bool]:
        """Count the new tokens (host and device); which live sequences ended: the stop id or
        the length cap (1 host sync: :meth:`_read`)."""
        st = self.slot_SC[: len(live)]
        st[:, GEN] += 1
        st[:, POS] += 1
        stop_B = chosen == self.vocab.stop_id
        self.stopped_N[st[:, SEQ]] = stop_B
        ended_B = stop_B | (st[:, GEN] >= self.max_new)
        ended = self._read(ended_B[:, None].long())
        for i in live:
            self.generated[i] += 1
        return [bool(e[0]) for e in ended]

    def result(self) -> Rollout:
        """The outputs of :meth:`run` on every rank (records broadcast from the last stage)."""
        dev, pg, w = self.device, self.pg, self.width
        plen = torch.tensor(self.plen, dtype=torch.long, device=dev)
        response = torch.tensor(self.generated, dtype=torch.long, device=dev)
        pos = torch.arange(w, device=dev)
        loss_mask = (pos >= plen[:, None] - 1) & (pos < (plen + response)[:, None] - 1)
        records_BSN = groups.broadcast_from_last_stage(self.records_BSN[:, :w].contiguous(), pg)
        records = {k: records_BSN[..., i] for i, k in enumerate(RECORDS)}  # views
        topk_ids = groups.broadcast_from_last_stage(self.topk_ids[:, :w].contiguous(), pg)
        teacher = None if self.teacher_topk is None else TeacherStats(
            groups.broadcast_from_last_stage(self.teacher_topk[:, :w].contiguous(), pg),
            records["teacher_logprob"])
        s = self.caches[0]
        t = self.caches[1] if len(self.caches) > 1 else None
        return Rollout(self.tokens[:, :w].contiguous(), plen, response, loss_mask, records,
                       topk_ids, teacher, self.stopped_N,
                       {"student": s.forwards, "teacher": t.forwards if t else 0,
                        "student_positions": s.positions,
                        "teacher_positions": t.positions if t else 0,
                        "kv_cache_bytes": sum(c.bytes() for c in self.caches),
                        "decode_steps": self.steps,
                        "cuda_graphs": sum(c.graphs.captured for c in self.caches
                                           if c.graphs is not None)},
                       time.perf_counter() - self.t0)
