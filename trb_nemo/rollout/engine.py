"""Continuous-batching student + teacher decoding with per-sequence KV caches under a behavior
policy.

Sequences, not rows: the prompts wait in a queue; at most ``max_in_flight`` sequences decode at
once (``rollout.max_sequences_in_flight``), each network's KV cache holds exactly that many
(:class:`~trb_nemo.rollout.kv_cache.SequenceCache`), and a sequence that ends frees its slot for
a waiting one, so memory is set by the budget and no work is spent on finished sequences. An
admitted group's prompts are prefilled in one forward per sub-batch of similar lengths (at most
``prefill_tokens`` positions each; long prompts in chunks), whatever their lengths, keeping only
each prompt's last logits; then every step feeds one token per live sequence. Both networks'
caches follow the same sequences in lockstep; the teacher's exists only when the policy needs
it.

Exact and invariant: sequence i's tokens and records depend only on the seed, its id
``sequence_ids[i]``, its positions and the weights: its sampling noise is keyed by (seed,
sequence id, position) (:class:`~trb_nemo.ops.vocab_parallel.RowNoise`), never by its row in a
batch, so neither the budget, the scheduling order, the other sequences, TP nor PP changes it
(records agree to float rounding: a matmul over more rows may sum in another order).

Output layout (``B`` sequences, ``S`` = longest prompt + ``max_new_tokens``): each row is its
prompt then its response, right-padded with 0. A sequence stops after the canonical stop id
(the student's; the teacher's is merged into it) or ``max_new_tokens``. Per-token records are
indexed by the position ``t`` whose logits drew token ``t + 1`` (the training layout:
``loss_mask[t]`` is true for response prefixes); when the teacher runs they also carry log pi_T
at the student's top-k ids (k = ``loss.topk``), so the loss needs no second teacher pass.

Ranks: every rank of the TP/PP group calls :func:`generate` with the same prompts and generator
state, and makes the same scheduling decisions. The last pipeline stage chooses tokens (all its
TP ranks agree); they are broadcast over the pipeline group every step (1 broadcast of [n]).
Host syncs per step: the chosen ids (the scheduler needs them) and the sampler's check that no
row lost every finite logit (:func:`~trb_nemo.ops.vocab_parallel.sample`). Records are broadcast at
the end.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from trb_nemo.models.gpt import fp8_padded_length
from trb_nemo.models.vocab import SharedVocab
from trb_nemo.ops.losses import teacher_logprobs_at
from trb_nemo.ops.vocab_parallel import RowNoise, logprobs_and_topk
from trb_nemo.parallel import groups
from trb_nemo.parallel.cpu_support import device_mode_suspended
from trb_nemo.parallel.groups import ParallelGroups
from trb_nemo.rollout.kv_cache import SequenceCache
from trb_nemo.rollout.policies import TrustRegionPolicy
from trb_nemo.scoring.teacher import TeacherStats

RECORDS = ("beta", "kl", "injected", "student_logprob", "teacher_logprob")
"""Per-token [B, S] fp32 records (NaN where not a response prefix or not measured), in this
order (the decoder keeps them as one [B, S, len(RECORDS)] tensor)."""


@dataclass
class Rollout:
    tokens: torch.Tensor
    """[B, S] int64: prompt, response, 0-padding."""
    prompt_lengths: torch.Tensor
    """[B] int64."""
    response_lengths: torch.Tensor
    """[B] int64, the stop token included when emitted."""
    loss_mask: torch.Tensor
    """[B, S] bool: position t is a response prefix (tokens[t + 1] is a response token)."""
    records: dict
    """RECORDS -> [B, S] fp32 at response prefixes (NaN elsewhere); ``teacher_logprob`` is
    log pi_T of the chosen token (NaN when the teacher did not run)."""
    topk_ids: torch.Tensor
    """[B, S, K] int64: the student's global top-k at each response prefix."""
    teacher: TeacherStats | None
    """What the teacher said at every response prefix (None when it did not run): the hand-off
    to scoring."""
    stopped: torch.Tensor
    """[B] bool: the row ended with the stop id (not by length)."""
    forwards: dict = field(default_factory=dict)
    """Forward calls {"student", "teacher"} (a prefill counts once) and token positions fed
    {"student_positions", "teacher_positions"} (rows x positions)."""
    seconds: float = 0.0

    def response(self, row: int) -> list[int]:
        """Token ids of row ``row``'s response (the stop id included when emitted)."""
        start = int(self.prompt_lengths[row])
        return self.tokens[row, start: start + int(self.response_lengths[row])].tolist()


@contextlib.contextmanager
def decode_mode(*models):
    """Run ``models`` in eval mode for decoding and restore each one's mode afterwards.

    Eval mode matters beyond dropout: with TE >= 2.2 Megatron keeps the causal mask in a
    one-token decode step of a model in training mode (``transformer/attention.py``). Under FP8
    the TE modules cache their FP8 weight copies after the first microbatch; the cache is
    invalidated here (``set_is_first_microbatch``) so decoding after an optimizer step uses the
    current weights, not the ones cast before the step.
    """
    models = [m for m in models if m is not None]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
        if getattr(m.config, "fp8", None) is not None and hasattr(m, "set_is_first_microbatch"):
            m.set_is_first_microbatch()
    try:
        yield
    finally:
        for m, mode in zip(models, was_training, strict=True):
            m.train(mode)


PREFILL_PADDING = 1.25
"""A prefill sub-batch takes prompts (longest first) while its padded size rows x longest
stays within this factor of the prompt tokens it holds."""


def generate(student, teacher, prompts: list[list[int]], policy, *, vocab: SharedVocab,
             max_new_tokens: int, topk_k: int, generator: torch.Generator, pg: ParallelGroups,
             sequence_ids: list[int] | None = None, max_in_flight: int = 64,
             prefill_tokens: int = 8192, rows_multiple: int | None = None,
             draft_tokens: int = 0) -> Rollout:
    """Decode ``prompts`` with ``policy`` (see the module docstring), the networks in eval mode
    (:func:`decode_mode`; their modes are restored on return). ``sequence_ids`` (default
    0..B-1) key each sequence's sampling noise together with one key drawn from ``generator``.
    Every forward feeds a multiple of ``rows_multiple`` rows (None: 16 under FP8, whose TE
    GEMMs need it, else 1); the extra rows feed nothing. ``draft_tokens > 0`` with a
    trust-region policy that runs the teacher decodes speculatively
    (:mod:`trb_nemo.rollout.speculative`: the same distribution, the teacher verifying that
    many student drafts per forward); other policies ignore it."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    ids = list(range(len(prompts))) if sequence_ids is None else list(sequence_ids)
    if len(ids) != len(prompts):
        raise ValueError(f"{len(ids)} sequence ids for {len(prompts)} prompts")
    used = [student] + ([teacher] if policy.needs_teacher() else [])
    if any(m.config.sequence_parallel for m in used):
        raise ValueError("the rollout engine feeds one token per sequence per step, which "
                         "sequence parallelism cannot split; set parallel.sequence_parallel=false")
    with decode_mode(*used), device_mode_suspended():
        # the outputs are allocated and handed over outside inference mode (training uses them
        # like any tensor); the decoding itself runs in it (no autograd bookkeeping per op, as
        # Megatron's own engines decode) and writes into them in place
        args = (student, teacher if policy.needs_teacher() else None, prompts, ids, policy,
                vocab, max_new_tokens, topk_k, generator, pg, max_in_flight, prefill_tokens,
                rows_multiple)
        if draft_tokens > 0 and policy.needs_teacher() and isinstance(policy, TrustRegionPolicy):
            from trb_nemo.rollout.speculative import SpeculativeDecoder

            decoder = SpeculativeDecoder(*args, draft_tokens=draft_tokens)
        else:
            decoder = _Decoder(*args)
        with torch.inference_mode():
            decoder.run()
        return decoder.result()


class _Decoder:
    """The scheduler and the records of one :func:`generate` call."""

    extra_positions = 0
    """Cache positions per sequence beyond prompt + max_new_tokens (speculative drafts)."""
    held_back = 0
    """Prompt tokens the prefill leaves unfed (the speculative decoder feeds the last one with
    the first drafts)."""

    def __init__(self, student, teacher, prompts, ids, policy, vocab, max_new_tokens, topk_k,
                 generator, pg, max_in_flight, prefill_tokens, rows_multiple):
        self.t0 = time.perf_counter()
        self.prompts, self.policy, self.vocab, self.pg = prompts, policy, vocab, pg
        self.max_new, self.prefill_tokens = max_new_tokens, prefill_tokens
        self.device = device = next(student.parameters()).device
        n = len(prompts)
        self.plen = [len(p) for p in prompts]
        self.width = max(self.plen) + max_new_tokens
        tokens = torch.zeros(n, self.width, dtype=torch.long)
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
        m = self.rows_multiple = rows_multiple or fp8_padded_length(1, fp8)
        slots = -(-min(max_in_flight, n) // m) * m
        room = self.width + self.extra_positions
        self.caches = [SequenceCache(student, slots, room, pg)]
        if teacher is not None:
            self.caches.append(SequenceCache(teacher, slots, room, pg))
        self.prefill_len = [k - self.held_back for k in self.plen]
        self.budget = min(max_in_flight, n)
        self.records_BSN = torch.full((n, self.width, len(RECORDS)), float("nan"), device=device)
        self.topk_k = topk_k
        self.topk_ids = torch.zeros(n, self.width, topk_k, dtype=torch.long, device=device)
        self.teacher_topk = (torch.full((n, self.width, topk_k), float("nan"), device=device)
                             if teacher is not None else None)
        self.generated = [0] * n
        self.stopped = [False] * n

    # ------------------------------------------------------------------------- scheduling

    def run(self) -> None:
        """Decode every sequence (the outputs are written in place; :meth:`result`)."""
        n = len(self.prompts)
        # longest prompts first: admitted groups then pad little (the order changes no result)
        waiting = sorted(range(n), key=lambda i: -self.plen[i])
        live: list[int] = []  # sequence in slot s = live[s]
        logits = [None] * len(self.caches)  # per network: [len(live), V / TP] pending logits
        while live or waiting:
            free = self.budget - len(live)
            if free and waiting:
                group, waiting = waiting[:free], waiting[free:]
                new = self._prefill(len(live), group)
                logits = new if not live else [
                    None if z is None else torch.cat([z, zn])
                    for z, zn in zip(logits, new, strict=True)]
                live += group
            chosen = self._choose(live, logits)
            ended = self._advance(live, chosen)
            live, src = self._compact(live, ended)
            if live:  # every live sequence feeds the token it drew: its next logits
                logits = self._decode(len(live), chosen[src])
        for c in self.caches:
            c.release()

    def _padded_rows(self, lo: int, hi: int) -> tuple[int, int]:
        """Slots [lo', hi') covering [lo, hi) with a multiple of ``rows_multiple`` rows."""
        m = self.rows_multiple
        rows = -(-(hi - lo) // m) * m
        slots = self.caches[0].slots
        lo2 = min(lo, slots - rows)
        return lo2, lo2 + rows

    def _feed_all(self, lo: int, hi: int, tokens_BL: torch.Tensor, counts: list[int],
                  caches: list | None = None, all_positions: bool = False) -> list:
        """Every network (or those of ``caches``) feeds slots [lo, hi); logits of those rows
        (last stage; at every fed position with ``all_positions``) or None."""
        lo2, hi2 = self._padded_rows(lo, hi)
        if (lo2, hi2) != (lo, hi):
            full = torch.zeros(hi2 - lo2, tokens_BL.shape[1], dtype=torch.long, device=self.device)
            full[lo - lo2: hi - lo2] = tokens_BL
            counts = [0] * (lo - lo2) + counts + [0] * (hi2 - hi)
            tokens_BL = full
        out = [c.feed(lo2, tokens_BL, counts, all_positions)
               for c in (self.caches if caches is None else caches)]
        return [None if z is None else z[lo - lo2: hi - lo2] for z in out]

    def _prefill(self, slot_lo: int, group: list[int]) -> list:
        """Prompts of ``group`` (longest first) into slots [slot_lo, ...): logits at each
        prompt's last token, per network. One forward per sub-batch of similar lengths."""
        out = [[] for _ in self.caches]
        for c in self.caches:
            for s in range(slot_lo, slot_lo + len(group)):
                c.start(s)
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

    def _decode(self, rows: int, tokens_B: torch.Tensor) -> list:
        return self._feed_all(0, rows, tokens_B[:, None], [1] * rows)

    def _compact(self, live: list[int], ended: list[bool]) -> tuple[list[int], list[int]]:
        """Drop ended sequences; the last live ones move into the holes, so the live sequences
        keep slots [0, n). Returns (live sequences by slot, the old slot of each)."""
        live, src = list(live), list(range(len(live)))
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
            live[hole], src[hole] = live[last], src[last]
            alive[hole], alive[last] = True, False
        n = sum(alive)
        return live[:n], src[:n]

    # ------------------------------------------------------------------------ per step

    def _choose(self, live: list[int], logits: list) -> torch.Tensor:
        """Each live sequence's next token (all ranks); records filled on the last stage."""
        seq_B = torch.tensor(live, dtype=torch.long, device=self.device)
        pos_B = torch.tensor([self.plen[i] + self.generated[i] - 1 for i in live],
                             dtype=torch.long, device=self.device)
        chosen = torch.zeros(len(live), dtype=torch.long, device=self.device)
        if self.pg.is_last_stage:
            chosen = self._choose_last_stage(logits, seq_B, pos_B)
        chosen = groups.broadcast_from_last_stage(chosen, self.pg)
        self.tokens[seq_B, pos_B + 1] = chosen
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
            at = teacher_logprobs_at(zt, torch.cat([choice.ids[:, None], top], dim=-1),
                                     vocab_group=group, vocab_size=vocab.size)
            values.append(at[:, 0])
            self.teacher_topk[seq_B, pos_B] = at[:, 1:]
        # one write of every record (RECORDS order) at these positions
        self.records_BSN[seq_B, pos_B, : len(values)] = torch.stack(
            [v if v.dtype == torch.float32 else v.float() for v in values], dim=-1)
        return choice.ids

    def _advance(self, live: list[int], chosen: torch.Tensor) -> list[bool]:
        """Count the new tokens; which live sequences ended (1 host sync: the ids)."""
        ended = []
        for i, tok in zip(live, chosen.tolist(), strict=True):
            self.generated[i] += 1
            stop = tok == self.vocab.stop_id
            self.stopped[i] = stop
            ended.append(stop or self.generated[i] >= self.max_new)
        return ended

    def result(self) -> Rollout:
        """The outputs of :meth:`run` on every rank (records broadcast from the last stage)."""
        dev, pg = self.device, self.pg
        plen = torch.tensor(self.plen, dtype=torch.long, device=dev)
        response = torch.tensor(self.generated, dtype=torch.long, device=dev)
        pos = torch.arange(self.width, device=dev)
        loss_mask = (pos >= plen[:, None] - 1) & (pos < (plen + response)[:, None] - 1)
        records_BSN = groups.broadcast_from_last_stage(self.records_BSN, pg)
        records = {k: records_BSN[..., i] for i, k in enumerate(RECORDS)}  # views
        topk_ids = groups.broadcast_from_last_stage(self.topk_ids, pg)
        teacher = None if self.teacher_topk is None else TeacherStats(
            groups.broadcast_from_last_stage(self.teacher_topk, pg), records["teacher_logprob"])
        s = self.caches[0]
        t = self.caches[1] if len(self.caches) > 1 else None
        return Rollout(self.tokens, plen, response, loss_mask, records, topk_ids, teacher,
                       torch.tensor(self.stopped, device=dev),
                       {"student": s.forwards, "teacher": t.forwards if t else 0,
                        "student_positions": s.positions,
                        "teacher_positions": t.positions if t else 0,
                        "kv_cache_bytes": sum(c.bytes() for c in self.caches)},
                       time.perf_counter() - self.t0)
