"""The rollout engine before continuous batching (static batch, rows fed in lockstep, prompts
fed one token per step past the shortest), kept only so benchmarks/rollout.py can measure the
new engine against it in the same run. Not used by trb_nemo.

Same output (:class:`trb_nemo.rollout.types.Rollout`); sampling noise keyed by batch row.
"""

from __future__ import annotations

import time

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from trb_nemo.models.vocab import SharedVocab
from trb_nemo.ops.sampling import RowNoise
from trb_nemo.ops.vocab_parallel import gather_at_ids, logprobs_at, logsumexp, topk
from trb_nemo.parallel import comm, groups
from trb_nemo.parallel.groups import ParallelGroups
from trb_nemo.rollout.engine import decode_mode
from trb_nemo.rollout.types import RECORDS, Rollout, TeacherStats


@torch.no_grad()
def generate(student, teacher, prompts: list[list[int]], policy, *, vocab: SharedVocab,
             max_new_tokens: int, topk_k: int, generator: torch.Generator,
             pg: ParallelGroups) -> Rollout:
    """Decode one batch of prompts with ``policy`` (see the module docstring), the networks in
    eval mode (:func:`decode_mode`; their modes are restored on return)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    used = [student] + ([teacher] if policy.needs_teacher() else [])
    with decode_mode(*used):
        return _generate(student, teacher, prompts, policy, vocab=vocab,
                         max_new_tokens=max_new_tokens, topk_k=topk_k, generator=generator, pg=pg)


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
    key = int(torch.randint(-(2**62), 2**62, (1,), generator=generator))
    rows_B = torch.arange(b, device=device)
    start = int(plen.min())
    zs = s_fwd(tokens[:, :start])
    zt = t_fwd(tokens[:, :start]) if use_teacher else None
    for t in range(start, total):
        generating = (t >= plen) & ~done  # rows that draw token t (from the prefix ending at t-1)
        chosen = torch.zeros(b, dtype=torch.long, device=device)
        if last:
            noise = RowNoise(key, rows_B, torch.full_like(rows_B, t - 1))
            chosen = _choose(policy, zs, zt, noise, vocab, group, topk_k, t - 1, generating,
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
        teacher_topk = TeacherStats(groups.broadcast_from_last_stage(teacher_topk, pg),
                                    records["teacher_logprob"])
    return Rollout(tokens, plen, response, loss_mask, records, topk_ids, teacher_topk, stopped,
                   {"student": s_fwd.forwards, "teacher": t_fwd.forwards if t_fwd else 0,
                    "student_positions": s_fwd.positions,
                    "teacher_positions": t_fwd.positions if t_fwd else 0},
                   time.perf_counter() - t0)


def _choose(policy, zs, zt, noise, vocab, group, k, pos, generating, records, topk_ids,
            teacher_topk):
    """Token for every row at one step (last stage); fills the records of generating rows."""
    zs = vocab.canonical(zs, group)
    zt = vocab.canonical(zt, group) if zt is not None else None
    choice = policy.choose(zs, zt, noise, group, vocab.size)
    kw = dict(vocab_group=group)
    lse_s = logsumexp(zs, vocab_group=group, vocab_size=vocab.size)
    values = {"beta": choice.beta, "kl": choice.kl, "injected": choice.injected.float(),
              "student_logprob": gather_at_ids(zs, choice.ids[:, None], **kw)[:, 0] - lse_s}
    _, ids = topk(zs, k, vocab_group=group, vocab_size=vocab.size)
    topk_ids[generating, pos] = ids[generating]
    if zt is not None:
        at = logprobs_at(zt, torch.cat([choice.ids[:, None], ids], dim=-1),
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


class CachedForward:
    """Feed positions [offset, offset + L) of a batch to one network; see the module docstring."""

    def __init__(self, model, batch_size: int, max_length: int, pg: ParallelGroups):
        self.model = model
        self.pg = pg
        self.batch_size = batch_size
        self.context = StaticInferenceContext(batch_size, max_length)
        self.offset = 0
        self.forwards = 0
        """Calls made (a prefill counts once; each decode step once)."""
        self.positions = 0
        """Token positions fed (rows x positions per call, summed)."""
        cfg = model.config
        self._hidden = (cfg.hidden_size, cfg.params_dtype)

    @torch.no_grad()
    def __call__(self, tokens_BL: torch.Tensor) -> torch.Tensor | None:
        b, length = tokens_BL.shape
        if self.offset + length > self.context.max_sequence_length:
            raise ValueError(f"KV cache holds {self.context.max_sequence_length} positions; "
                             f"feeding {length} more after {self.offset}")
        positions = torch.arange(self.offset, self.offset + length,
                                 device=tokens_BL.device).expand(b, length)
        if self.offset > 0:
            self.context.enable_decode_mode()
        pg = self.pg
        if not pg.is_first_stage:
            hidden = comm.recv((length, b, self._hidden[0]), self._hidden[1], pg.pp_rank - 1,
                               pg.pipeline, device=tokens_BL.device)
            self.model.set_input_tensor(hidden)
        out = self.model(tokens_BL, positions, attention_mask=None, inference_context=self.context)
        self.context.increment_sequence_len_offset(length)
        self.offset += length
        self.forwards += 1
        self.positions += b * length
        if not pg.is_last_stage:
            comm.send(out, pg.pp_rank + 1, pg.pipeline)
            return None
        return out[:, -1, :]  # [B, V_pad / TP] at the last fed position
