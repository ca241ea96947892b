"""Lockstep student + teacher decoding with KV caches under a behavior policy.

Layout of a rollout batch (``B`` rows, ``S`` = longest prompt + ``max_new_tokens``): each row
is its prompt then its response, right-padded with 0. Decoding starts at the shortest prompt
length L0 (prefill of positions [0, L0) for both networks), then feeds one position per step;
a row still inside its prompt is fed its prompt token (Megatron's static-batch scheme), so no
row ever needs padding inside its sequence and no prefix is recomputed. A row stops after the
canonical stop id (the student's; the teacher's is merged into it) or ``max_new_tokens``.

Per-token records are indexed by the position ``t`` whose logits drew token ``t + 1`` (the
training layout: ``loss_mask[t]`` is true for response prefixes). The teacher runs only when
the policy needs it; then the records also carry log pi_T at the student's top-k ids (k =
``loss.topk``), so the loss needs no second teacher pass.

Ranks: every rank of the TP/PP group calls :func:`generate` with the same prompts and generator
state. The last pipeline stage chooses tokens (all its TP ranks agree); they are broadcast over
the pipeline group, so every rank holds the same tokens. Records are broadcast at the end.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from trb_nemo.models.gpt import fp8_padded_length
from trb_nemo.models.vocab import SharedVocab
from trb_nemo.ops.losses import teacher_logprobs_at
from trb_nemo.ops.vocab_parallel import gather_at_ids, logsumexp, topk
from trb_nemo.parallel import groups
from trb_nemo.parallel.groups import ParallelGroups
from trb_nemo.rollout.kv_decoder import CachedForward

RECORDS = ("beta", "kl", "injected", "student_logprob", "teacher_logprob")
"""Per-token [B, S] fp32 records (NaN where not a response prefix or not measured)."""


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
    teacher_topk_logprobs: torch.Tensor | None
    """[B, S, K] fp32 log pi_T at ``topk_ids`` (None when the teacher did not run)."""
    stopped: torch.Tensor
    """[B] bool: the row ended with the stop id (not by length)."""
    forwards: dict = field(default_factory=dict)
    """Forward calls {"student", "teacher"} (a prefill counts once) and token positions fed
    {"student_positions", "teacher_positions"} (rows x positions)."""
    seconds: float = 0.0

    def first_rows(self, n: int) -> Rollout:
        """The rollout of rows [0, n) only (the counts of work done stay those of the whole)."""
        def cut(x):
            return x[:n] if isinstance(x, torch.Tensor) else x
        return Rollout(cut(self.tokens), cut(self.prompt_lengths), cut(self.response_lengths),
                       cut(self.loss_mask), {k: cut(v) for k, v in self.records.items()},
                       cut(self.topk_ids), cut(self.teacher_topk_logprobs), cut(self.stopped),
                       dict(self.forwards), self.seconds)

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


@torch.no_grad()
def generate(student, teacher, prompts: list[list[int]], policy, *, vocab: SharedVocab,
             max_new_tokens: int, topk_k: int, generator: torch.Generator,
             pg: ParallelGroups) -> Rollout:
    """Decode one batch of prompts with ``policy`` (see the module docstring), the networks in
    eval mode (:func:`decode_mode`; their modes are restored on return)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    used = [student] + ([teacher] if policy.needs_teacher() else [])
    fp8 = next((m.config.fp8 for m in used if m.config.fp8 is not None), None)
    # Under FP8 a decode step's token count (the rows) must be a multiple of 16 for TE's GEMMs:
    # extra rows repeat the first prompt and are dropped. Sampling noise is keyed by row, so
    # the real rows draw exactly what they would alone.
    rows = fp8_padded_length(len(prompts), fp8)
    padded = prompts + [prompts[0]] * (rows - len(prompts))
    with decode_mode(*used):
        ro = _generate(student, teacher, padded, policy, vocab=vocab,
                       max_new_tokens=max_new_tokens, topk_k=topk_k, generator=generator, pg=pg)
    return ro if rows == len(prompts) else ro.first_rows(len(prompts))


def _generate(student, teacher, prompts, policy, *, vocab, max_new_tokens, topk_k, generator, pg):
    t0 = time.perf_counter()
    device = next(student.parameters()).device
    b = len(prompts)
    plen = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    total = int(plen.max()) + max_new_tokens
    tokens = torch.zeros(b, total, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
    group, last = pg.tensor, pg.is_last_stage
    use_teacher = policy.needs_teacher()
    s_fwd = CachedForward(student, b, total, pg)
    t_fwd = CachedForward(teacher, b, total, pg) if use_teacher else None
    nan = torch.full((b, total), float("nan"), device=device)
    records = {k: nan.clone() for k in RECORDS}
    topk_ids = torch.zeros(b, total, topk_k, dtype=torch.long, device=device)
    teacher_topk = torch.full((b, total, topk_k), float("nan"), device=device) if use_teacher else None
    done = torch.zeros(b, dtype=torch.bool, device=device)
    stopped = torch.zeros(b, dtype=torch.bool, device=device)
    start = int(plen.min())
    zs = s_fwd(tokens[:, :start])
    zt = t_fwd(tokens[:, :start]) if use_teacher else None
    for t in range(start, total):
        generating = (t >= plen) & ~done  # rows that draw token t (from the prefix ending at t-1)
        chosen = torch.zeros(b, dtype=torch.long, device=device)
        if last:
            chosen = _choose(policy, zs, zt, generator, vocab, group, topk_k, t - 1, generating,
                             records, topk_ids, teacher_topk)
        chosen = groups.broadcast_from_last_stage(chosen, pg)
        tokens[:, t] = torch.where(generating, chosen, torch.where(t < plen, tokens[:, t], 0))
        ended = generating & (chosen == vocab.stop_id)
        stopped |= ended
        done |= ended | (generating & (t + 1 - plen >= max_new_tokens))
        if bool(done.all()) or t + 1 == total:
            break
        zs = s_fwd(tokens[:, t:t + 1])
        zt = t_fwd(tokens[:, t:t + 1]) if use_teacher else None
    response = _response_lengths(tokens, plen, stopped, max_new_tokens, vocab.stop_id)
    pos = torch.arange(total, device=device)
    loss_mask = (pos >= plen[:, None] - 1) & (pos < (plen + response)[:, None] - 1)
    for k in RECORDS:
        records[k] = groups.broadcast_from_last_stage(records[k].contiguous(), pg)
    topk_ids = groups.broadcast_from_last_stage(topk_ids, pg)
    if teacher_topk is not None:
        teacher_topk = groups.broadcast_from_last_stage(teacher_topk, pg)
    return Rollout(tokens, plen, response, loss_mask, records, topk_ids, teacher_topk, stopped,
                   {"student": s_fwd.forwards, "teacher": t_fwd.forwards if t_fwd else 0,
                    "student_positions": s_fwd.positions,
                    "teacher_positions": t_fwd.positions if t_fwd else 0},
                   time.perf_counter() - t0)


def _choose(policy, zs, zt, generator, vocab, group, k, pos, generating, records, topk_ids,
            teacher_topk):
    """Token for every row at one step (last stage); fills the records of generating rows."""
    zs = vocab.canonical(zs, group)
    zt = vocab.canonical(zt, group) if zt is not None else None
    choice = policy.choose(zs, zt, generator, group, vocab.size)
    kw = dict(vocab_group=group)
    lse_s = logsumexp(zs, vocab_group=group, vocab_size=vocab.size)
    values = {"beta": choice.beta, "kl": choice.kl, "injected": choice.injected.float(),
              "student_logprob": gather_at_ids(zs, choice.ids[:, None], **kw)[:, 0] - lse_s}
    _, ids = topk(zs, k, vocab_group=group, vocab_size=vocab.size)
    topk_ids[generating, pos] = ids[generating]
    if zt is not None:
        at = teacher_logprobs_at(zt, torch.cat([choice.ids[:, None], ids], dim=-1),
                                 vocab_group=group, vocab_size=vocab.size)
        values["teacher_logprob"] = at[:, 0]
        teacher_topk[generating, pos] = at[generating, 1:]
    for name, v in values.items():
        records[name][generating, pos] = v[generating].float()
    return choice.ids


def _response_lengths(tokens, plen, stopped, max_new_tokens, stop_id):
    """Tokens after each prompt up to and including the first stop id (or max_new_tokens)."""
    b, total = tokens.shape
    pos = torch.arange(total, device=tokens.device)
    in_response = (pos >= plen[:, None]) & (pos < plen[:, None] + max_new_tokens)
    is_stop = in_response & (tokens == stop_id)
    first_stop = torch.where(is_stop, pos, total).min(dim=1).values
    lengths = torch.where(stopped, first_stop - plen + 1,
                          torch.clamp(total - plen, max=max_new_tokens))
    return lengths
